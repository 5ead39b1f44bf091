import pytest

from conftest import PROJECT_ROOT
from pipeline.config import ExtractSettings, TrainSettings, load_params, settings_from_mapping


def test_the_project_params_file_loads():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.train.members >= 1
    assert params.extract.layout in ("native", "dense")


def test_unknown_key_is_refused_with_its_name(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seeed: 3\n")
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['seeed'\]"):
        load_params(path)


def test_mistyped_value_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("extract:\n  steps: '50,150'\n")
    with pytest.raises(ValueError, match="`steps` must be list"):
        load_params(path)


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  seed: 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_params(path)


def test_values_are_checked():
    with pytest.raises(ValueError, match="0..999"):
        settings_from_mapping(ExtractSettings, {"steps": [50, 1000]}, "extract")
    with pytest.raises(ValueError, match="layout"):
        settings_from_mapping(ExtractSettings, {"layout": "sparse"}, "extract")
    with pytest.raises(ValueError, match="must be int"):
        settings_from_mapping(TrainSettings, {"members": True}, "train")
    assert settings_from_mapping(TrainSettings, {"learning_rate": 1}, "train").learning_rate == 1


def test_defaults_are_the_papers():
    extract, train = ExtractSettings(), TrainSettings()
    assert extract.steps == [50, 150, 250] and extract.blocks == [5, 6, 7, 8, 12] and extract.size == 256
    assert (train.members, train.learning_rate, train.batch_size, train.max_epochs) == (10, 0.001, 64, 100)
    assert (train.patience, train.patience_from_epoch) == (50, 4)
    assert train.min_class_pixels is None  # the paper's 20 at 256², scaled with the image area
