import json

import pytest

from pipeline.data.folders import ClassInfo
from pipeline.data.presets import Preset, load_preset, preset_for_dataset, preset_names

# The paper's protocol (NOTES.md; the official experiments/<name>/ddpm.json):
# train / test images, classes, ignore label, checkpoint, mIoU ± std (%).
PAPER = {
    "bedroom_28": (40, 20, 29, 0, "lsun_bedroom.pt", 49.4, 1.9),
    "ffhq_34": (20, 20, 34, 255, "ffhq.pt", 59.1, 1.4),
    "cat_15": (30, 20, 15, 255, "lsun_cat.pt", 53.7, 3.3),
    "horse_21": (30, 30, 21, 255, "lsun_horse.pt", 65.0, 0.8),
    "celeba_19": (20, 500, 19, 255, "ffhq.pt", 59.9, 1.0),
    "ade_bedroom_30": (50, 650, 30, 255, "lsun_bedroom.pt", 34.6, 1.7),
}


def test_all_six_presets_exist_and_load():
    assert preset_names() == sorted(PAPER)
    for name, (train, test, classes, ignore, checkpoint, miou, std) in PAPER.items():
        preset = load_preset(name)
        assert (preset.name, preset.train_images, preset.test_images) == (name, train, test)
        assert (preset.num_classes, len(preset.class_names), preset.ignore_label) == (classes, classes, ignore)
        assert (preset.checkpoint, preset.paper_miou, preset.paper_miou_std) == (checkpoint, miou, std)
        assert preset.checkpoint_url.endswith(f"/{checkpoint}")
        assert (preset.image_size, preset.steps, preset.blocks) == (256, [50, 150, 250], [5, 6, 7, 8, 12])


def test_bedroom_28_scores_28_classes_because_its_ignore_label_is_class_0():
    preset = load_preset("bedroom_28")
    assert preset.class_names[0] == "background" and preset.scored_classes == 28
    assert load_preset("ffhq_34").scored_classes == 34
    assert load_preset("ade_bedroom_30").class_names[:2] == ["wall", "bed"]


@pytest.mark.parametrize("name", ["ffhq_34", "cat_15", "horse_21"])
def test_presets_agree_with_the_datasets_classes_json(shared_dir, name):
    document = json.loads((shared_dir / "datasets" / "ddpm-seg" / name / "classes.json").read_text())
    preset = load_preset(name)
    assert preset.class_names == document["names"] and preset.num_classes == document["num_classes"]
    assert (preset.ignore_label, preset.train_images, preset.test_images) == (
        document["ignore_label"], document["train"], document["test"]
    )


def test_a_preset_file_path_loads_and_bad_files_are_refused(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nclass_names: [a, b]\nnum_classes: 2\nignore_label: 255\ntrain_images: 3\ntest_images: 0\n")
    assert load_preset(good) == Preset("mine", ["a", "b"], 2, 255, 3, 0)
    (tmp_path / "typo.yaml").write_text(good.read_text() + "stpes: [1]\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*unknown key\(s\) \['stpes'\]"):
        load_preset(tmp_path / "typo.yaml")
    (tmp_path / "miscount.yaml").write_text(good.read_text().replace("num_classes: 2", "num_classes: 3"))
    with pytest.raises(ValueError, match="num_classes is 3 but class_names lists 2"):
        load_preset(tmp_path / "miscount.yaml")
    (tmp_path / "short.yaml").write_text("name: short\n")
    with pytest.raises(ValueError, match=r"missing key\(s\)"):
        load_preset(tmp_path / "short.yaml")
    with pytest.raises(FileNotFoundError, match="known presets: .*ffhq_34"):
        load_preset("ffhq_35")


def test_a_users_dataset_gets_the_papers_features_and_its_own_counts():
    preset = preset_for_dataset(ClassInfo(["bg", "thing"], 255), "mine", {"train": 5})
    assert (preset.train_images, preset.test_images, preset.num_classes) == (5, 0, 2)
    assert (preset.steps, preset.blocks, preset.paper_miou) == ([50, 150, 250], [5, 6, 7, 8, 12], None)


def test_the_feature_presets_load_and_unknown_ones_are_named():
    from pipeline.data.presets import feature_preset_names, load_feature_preset

    assert "sd21-dift" in feature_preset_names()
    dift = load_feature_preset("sd21-dift")
    assert (dift.image_size, dift.steps, dift.blocks, dift.noise_draws) == (768, [261], ["up_blocks.1"], 8)
    with pytest.raises(FileNotFoundError, match="sd21-dift"):
        load_feature_preset("sd99")


def test_the_few_shot_presets_hold_the_published_protocols():
    from pipeline.data.folders import ClassInfo
    from pipeline.data.presets import fewshot_preset_names, load_fewshot_preset

    assert fewshot_preset_names() == ["coco_20i", "lvis_92i", "pascal_5i"]
    protocols = {name: load_fewshot_preset(name) for name in fewshot_preset_names()}
    assert [(p.folds, p.fold_layout, p.episodes, p.num_classes, p.image_size) for p in protocols.values()] == [
        (4, "interleaved", 1000, 81, 512), (10, "interleaved", 2300, 921, 512), (4, "blocks", 1000, 21, 512)]
    assert protocols["coco_20i"].paper == {"in_context_1shot": 71.3, "in_context_5shot": 72.2,
                                           "strict_1shot": 51.2, "strict_5shot": 56.0}
    protocols["pascal_5i"].check_dataset(ClassInfo([f"c{k}" for k in range(21)], 255), "voc")
    with pytest.raises(ValueError, match="has 3 classes and ignore label 255, but coco_20i has 81 and 255"):
        protocols["coco_20i"].check_dataset(ClassInfo(["a", "b", "c"], 255), "mine")
    with pytest.raises(FileNotFoundError, match="known: \\['coco_20i'"):
        load_fewshot_preset("coco")
