"""The few-shot protocol (DiffewS / HSNet): class folds, seeded episodes, episode loading and
the scores, on tiny generated label maps."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.folders import ClassInfo, list_images
from pipeline.fewshot.episodes import (
    Episode,
    dataset_fold,
    fold_classes,
    index_classes,
    load_episode,
    make_episodes,
    split_classes,
)
from pipeline.fewshot.metrics import FewShotScores

NAMES = ["background", "skin", "hair", "ear", "eye", "brow", "nose", "mouth"]  # the demo's classes.json
CLASSES = ClassInfo(NAMES, ignore_label=255)
SIDE = 8


def tiny_labels(index: int) -> np.ndarray:
    """uint8 (8, 8): skin (1) in even images, brow (5) in those not divisible by 3, ear (3) in
    images 0 and 1 only, eye (4) in all, hair (2) in none; the last row ignored every 4th image."""
    labels = np.zeros((SIDE, SIDE), dtype=np.uint8)
    if index % 2 == 0:
        labels[0:3, 0:3] = 1
    if index % 3 != 0:
        labels[4:7, 4:7] = 5
    if index < 2:
        labels[0:2, 5:7] = 3
    labels[5:7, 0:2] = 4
    if index % 4 == 0:
        labels[7, :] = 255
    return labels


@pytest.fixture
def records(tmp_path):
    """Ten labeled 8×8 images: skin in 0, 2, 4, 6, 8; brow in 1, 2, 4, 5, 7, 8; ear in 0, 1."""
    rng = np.random.default_rng(0)
    for index in range(10):
        Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)).save(tmp_path / f"img_{index:02d}.png")
        np.save(tmp_path / f"img_{index:02d}.npy", tiny_labels(index))
    return list_images(tmp_path)


def holds(records, name: str, class_index: int) -> bool:
    (record,) = [record for record in records if record.name == name]
    return bool((np.load(record.label_path) == class_index).any())


# --- folds -----------------------------------------------------------------------------------------


def test_coco_folds_follow_the_hsnet_rule():
    splits = [fold_classes(81, 4, fold) for fold in range(4)]  # labels 0 (background), 1..80
    assert splits[0].test_classes[:3] == (1, 5, 9) and splits[0].test_classes[-1] == 77
    for fold, split in enumerate(splits):
        assert split.test_classes == tuple(range(fold + 1, 81, 4)) and len(split.test_classes) == 20
        assert set(split.train_classes) == set(range(1, 81)) - set(split.test_classes)
    tested = [label for split in splits for label in split.test_classes]
    assert sorted(tested) == list(range(1, 81))  # disjoint, and together all 80 classes


def test_folds_of_the_seven_face_parts():
    expected = [(1, 5), (2, 6), (3, 7), (4,)]
    assert [dataset_fold(CLASSES, 4, fold).test_classes for fold in range(4)] == expected
    assert [fold_classes(8, 4, fold).test_classes for fold in range(4)] == expected
    assert dataset_fold(CLASSES, 4, 3).train_classes == (1, 2, 3, 5, 6, 7)
    # PASCAL-5i's contiguous blocks, and a given class list.
    assert fold_classes(21, 4, 1, ignore=(0, 255), layout="blocks").test_classes == (6, 7, 8, 9, 10)
    assert [split_classes(range(1, 8), 4, fold, "blocks").test_classes for fold in range(4)] == [
        (1, 2), (3, 4), (5, 6), (7,)]
    # An ignore label that is a class index (label 0 unannotated) leaves the background as a class.
    assert dataset_fold(ClassInfo(NAMES, ignore_label=0), 4, 0, background=None).test_classes == (1, 5)


def test_a_split_by_name_tests_those_classes_and_trains_on_every_other():
    from pipeline.fewshot.episodes import named_fold

    fold = named_fold(CLASSES, ["mouth", "ear"])
    assert fold.test_classes == (3, 7) and fold.train_classes == (1, 2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"novel classes \['tail'\] are not among"):
        named_fold(CLASSES, ["ear", "tail"])
    with pytest.raises(ValueError, match="cannot be a novel class"):
        named_fold(CLASSES, ["background"])


def test_folds_refuse_bad_folds():
    for folds, fold in ((4, 4), (4, -1), (0, 0)):
        with pytest.raises(ValueError, match=f"fold must be in .*got fold {fold} of {folds}"):
            fold_classes(81, folds, fold)
    with pytest.raises(ValueError, match="fold 7 of 8 has no class: only 7 classes"):
        dataset_fold(CLASSES, 8, 7)
    with pytest.raises(ValueError, match="repeats a class"):
        split_classes([1, 2, 2], 2, 0)
    with pytest.raises(ValueError, match="layout must be"):
        split_classes([1, 2], 2, 0, layout="random")


# --- episodes --------------------------------------------------------------------------------------


def test_episodes_are_reproducible_and_seeded(records):
    first = make_episodes(records, (1, 5), shots=2, count=50, seed=0)
    assert first == make_episodes(records, (1, 5), shots=2, count=50, seed=0)
    assert first[:10] == make_episodes(records, (1, 5), shots=2, count=10, seed=0)  # episode i fixed
    assert first != make_episodes(records, (1, 5), shots=2, count=50, seed=1)
    assert len(first) == 50 and all(isinstance(episode, Episode) for episode in first)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first[0].query = "other"


def test_every_episode_holds_its_class_in_distinct_images(records):
    episodes = make_episodes(records, (1, 5), shots=3, count=200, seed=0)
    assert {episode.class_index for episode in episodes} == {1, 5}
    for episode in episodes:
        names = (episode.query, *episode.supports)
        assert len(episode.supports) == 3 and len(set(names)) == 4
        assert all(holds(records, name, episode.class_index) for name in names)
    # Every image holding skin is sometimes its query: queries are not limited to a subset.
    assert {episode.query for episode in episodes if episode.class_index == 1} == {f"img_{i:02d}" for i in (0, 2, 4, 6, 8)}


def test_class_weights_favour_a_class_and_bad_weights_are_refused(records):
    weighted = make_episodes(records, (1, 5), shots=1, count=400, seed=0, class_weights=[3.0, 1.0])
    share = np.mean([episode.class_index == 1 for episode in weighted])
    assert 0.68 < share < 0.82  # 3 : 1
    uniform = make_episodes(records, (1, 5), shots=1, count=400, seed=0)
    assert 0.4 < np.mean([episode.class_index == 1 for episode in uniform]) < 0.6
    for weights in ([1.0], [1.0, 0.0], [1.0, -2.0]):
        with pytest.raises(ValueError, match="class_weights must be 2 positive numbers"):
            make_episodes(records, (1, 5), shots=1, count=4, class_weights=weights)


def test_class_index_counts_pixels_at_a_size(tmp_path, records):
    index = index_classes(records, (1, 3, 5))
    assert index.images[3] == ("img_00", "img_01") and len(index.images[5]) == 6
    assert index_classes(records, (3,), min_pixels=5).images[3] == ()  # ear holds 4 pixels
    labels = np.zeros((SIDE, SIDE), dtype=np.uint8)
    labels[1, 1] = 6  # one pixel at (1, 1): not sampled by nearest neighbour at 4×4 (rows 0, 2, 4, 6)
    Image.new("RGB", (SIDE, SIDE)).save(tmp_path / "dot.png")
    np.save(tmp_path / "dot.npy", labels)
    dot = [record for record in list_images(tmp_path) if record.name == "dot"]
    assert index_classes(dot, (6,)).images[6] == ("dot",)
    assert index_classes(dot, (6,), size=4).images[6] == ()
    assert make_episodes(index, (1, 5), shots=1, count=5) == make_episodes(records, (1, 5), shots=1, count=5)


def test_episodes_refuse_impossible_requests(records):
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        make_episodes(records, (1, 5), shots=0, count=5)
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        make_episodes(records, (1, 5), shots=1, count=0)
    with pytest.raises(ValueError, match=r"class 2 \(hair\), 6 \(nose\) occurs in none of the 10 images"):
        make_episodes(records, dataset_fold(CLASSES, 4, 1).test_classes, shots=1, count=5, names=NAMES)
    with pytest.raises(ValueError, match=r"needs 6 images .* class 1 \(skin\) is held by only 5"):
        make_episodes(records, (1, 5), shots=5, count=5, names=NAMES)
    with pytest.raises(ValueError, match=r"covers classes \[1, 5\], not \[3\]"):
        make_episodes(index_classes(records, (1, 5)), (1, 3), shots=1, count=5)
    records[0].label_path.unlink()
    with pytest.raises(ValueError, match="img_00.png"):
        make_episodes(list_images(records[0].image_path.parent), (1, 5), shots=1, count=5)


# --- scores ----------------------------------------------------------------------------------------


def test_scores_match_hand_computed_iou_and_fb_iou():
    scores = FewShotScores((1, 5), names=NAMES)
    # Skin: foreground ∩ 1, ∪ 3; background ∩ 3, ∪ 5.
    scores.update(1, np.array([[1, 1, 0], [0, 0, 0]], bool), np.array([[1, 0, 0], [1, 0, 0]], bool))
    # Brow, pixel (0, 2) ignored (its false positive counts nowhere): foreground 2 / 2, background 3 / 3.
    scores.update(5, np.array([[1, 1, 1], [0, 0, 0]], bool), np.array([[1, 1, 0], [0, 0, 0]], bool),
                  scored=np.array([[1, 1, 0], [1, 1, 1]], bool))
    # Skin missed: foreground 0 / 1, background 5 / 6.
    scores.update(1, torch.zeros(2, 3, dtype=torch.bool), torch.tensor([[0, 0, 0], [0, 0, 1]]).bool())
    np.testing.assert_allclose(scores.per_class_iou(), [1 / 4, 2 / 2])
    summary = json.loads(json.dumps(scores.summary()))
    assert summary["miou"] == pytest.approx(0.625)
    assert summary["fb_iou"] == pytest.approx(((1 + 2 + 0) / 6 + (3 + 3 + 5) / 14) / 2)  # 9/14
    assert summary["per_class_iou"] == {"skin": pytest.approx(0.25), "brow": pytest.approx(1.0)}
    assert summary["episodes_per_class"] == {"skin": 2, "brow": 1} and summary["episodes"] == 3


def test_a_class_never_drawn_scores_zero_and_bad_input_is_refused():
    scores = FewShotScores((1, 5, 7))
    scores.update(1, np.ones((2, 2), bool), np.ones((2, 2), int))
    assert scores.summary()["per_class_iou"] == {"1": 1.0, "5": 0.0, "7": 0.0}
    assert scores.mean_iou() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"class 2 is not one of the fold's classes \[1, 5, 7\]"):
        scores.update(2, np.ones((2, 2), bool), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="one \\(H, W\\) shape"):
        scores.update(1, np.ones((2, 2), bool), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"target must be a binary mask, found values \[0, 2\]"):
        scores.update(1, np.ones((2, 2), bool), np.array([[0, 2], [2, 2]]))
    with pytest.raises(ValueError, match="no episode has been scored"):
        FewShotScores((1,)).summary()


# --- loading ---------------------------------------------------------------------------------------


def test_load_episode_shapes_dtypes_and_values(records):
    episode = Episode(5, "img_04", ("img_01", "img_02"))
    inputs = load_episode(episode, records, CLASSES, size=16)
    assert inputs.query_image.shape == (3, 16, 16) and inputs.query_image.dtype == torch.float32
    assert inputs.support_images.shape == (2, 3, 16, 16) and inputs.support_images.dtype == torch.float32
    assert -1 <= inputs.query_image.min() and inputs.support_images.max() <= 1
    assert inputs.query_mask.shape == (16, 16) and inputs.query_mask.dtype == torch.bool
    assert inputs.support_masks.shape == (2, 16, 16) and inputs.support_masks.dtype == torch.float32
    assert set(inputs.support_masks.unique().tolist()) == {0.0, 1.0}
    expected = np.kron(tiny_labels(4) == 5, np.ones((2, 2), bool))  # nearest ×2
    np.testing.assert_array_equal(inputs.query_mask.numpy(), expected)
    assert not inputs.query_scored[14:].any() and inputs.query_scored[:14].all()  # image 4's ignored last row
    np.testing.assert_array_equal(inputs.support_masks[1].numpy(), np.kron(tiny_labels(2) == 5, np.ones((2, 2))))
    native = load_episode(episode, {record.name: record for record in records}, CLASSES, size=None)
    assert native.query_image.shape == (3, SIDE, SIDE) and native.support_masks.shape == (2, SIDE, SIDE)


def test_load_episode_refuses_empty_supports_other_sizes_and_bad_classes(records, tmp_path):
    with pytest.raises(ValueError, match=r"support img_00 holds no pixel of class 5 \(brow\) at 16×16"):
        load_episode(Episode(5, "img_04", ("img_02", "img_00")), records, CLASSES, size=16)
    Image.new("RGB", (12, SIDE)).save(tmp_path / "wide.png")
    np.save(tmp_path / "wide.npy", np.full((SIDE, 12), 5, dtype=np.uint8))
    with pytest.raises(ValueError, match="support wide is 8×12 .* the query img_04 is 8×8: give load_episode a size"):
        load_episode(Episode(5, "img_04", ("wide",)), list_images(tmp_path), CLASSES, size=None)
    assert load_episode(Episode(5, "img_04", ("wide",)), list_images(tmp_path), CLASSES, size=8).support_masks.all()
    with pytest.raises(ValueError, match="episode class 255 is not a class of this dataset"):
        load_episode(Episode(255, "img_04", ("img_02",)), records, CLASSES, size=8)
    with pytest.raises(ValueError, match="episode image 'img_99' is not among the 10 images"):
        load_episode(Episode(5, "img_04", ("img_99",)), records, CLASSES, size=8)


def test_a_tiny_model_runs_and_scores_an_episode(records):
    """The integration the protocol is for: episodes → inputs → FewShotUNet → decoded masks → scores."""
    from diffusers import UNet2DModel

    from pipeline.fewshot.masks import decode_masks, masks_to_maps
    from pipeline.fewshot.model import FewShotUNet

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
    )
    model = FewShotUNet(unet).eval()
    scores = FewShotScores((1, 5), names=NAMES)
    for episode in make_episodes(records, (1, 5), shots=2, count=2, seed=0):
        inputs = load_episode(episode, records, CLASSES, size=16)
        with torch.inference_mode():
            maps = model(inputs.query_image[None], inputs.support_images[None],
                         masks_to_maps(inputs.support_masks, 3)[None])  # (1, 3, 16, 16)
        scores.update(episode.class_index, decode_masks(maps)[0], inputs.query_mask, inputs.query_scored)
    summary = scores.summary()
    assert summary["episodes"] == 2 and 0 <= summary["miou"] <= 1 and 0 <= summary["fb_iou"] <= 1
