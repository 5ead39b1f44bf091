"""Image sizes: S or H,W, resize rules rounded to a model's multiple, and what stores record."""

import pytest

from pipeline.config import ExtractSettings, settings_from_mapping
from pipeline.sizes import apply_rule, as_shape, check_multiple, describe, parse_size, recorded_size


def test_a_size_is_one_number_or_height_and_width():
    assert parse_size("256") == 256 and as_shape(256) == (256, 256)
    assert parse_size("360, 480") == [360, 480] and as_shape([360, 480]) == (360, 480)
    assert parse_size("64,64") == 64  # a square is recorded as one number, as before rectangles
    for bad in ("", "0", "a,b", "1,2,3", "-5"):
        with pytest.raises(ValueError, match="one number S .* or H,W"):
            parse_size(bad)


def test_square_stores_record_one_number_and_others_height_and_width():
    assert recorded_size((256, 256)) == 256 and recorded_size((360, 480)) == [360, 480]
    assert describe(256) == "256²" and describe([360, 480]) == "480×360"  # width × height, as people say it


def test_a_rule_keeps_the_aspect_ratio_and_rounds_to_the_models_multiple():
    # CamVid-like 480×360 (H 360, W 480): the shorter side becomes 256, 341.3 rounds to 352 (11 × 32).
    assert apply_rule("shorter:256", (360, 480), 32) == (256, 352)
    assert apply_rule("longer:512", (360, 480), 32) == (384, 512)
    assert apply_rule("shorter:256", (480, 360), 32) == (352, 256)  # portrait stays portrait
    assert apply_rule("shorter:256", (256, 256), 32) == (256, 256)
    assert apply_rule("shorter:8", (100, 1000), 32) == (32, 64)  # never below one multiple
    for bad in ("shorter", "wider:256", "shorter:x", "shorter:0"):
        with pytest.raises(ValueError, match="shorter:N or longer:N"):
            apply_rule(bad, (10, 10), 8)


def test_a_size_the_model_cannot_take_is_refused_with_a_way_out():
    check_multiple((352, 256), 32, "the ADM")
    with pytest.raises(ValueError, match=r"480×360 does not fit the ADM: .*multiples of 32.*--resize shorter:360"):
        check_multiple((360, 480), 32, "the ADM")


def test_extract_settings_take_a_square_a_rectangle_or_a_rule():
    assert settings_from_mapping(ExtractSettings, {"size": [360, 480]}, "params.yaml: extract").size == [360, 480]
    assert settings_from_mapping(ExtractSettings, {"resize": "shorter:256"}, "params.yaml: extract").resize == "shorter:256"
    with pytest.raises(ValueError, match="params.yaml: extract: size"):
        settings_from_mapping(ExtractSettings, {"size": [1, 2, 3]}, "params.yaml: extract")
    with pytest.raises(ValueError, match="shorter:N or longer:N"):
        settings_from_mapping(ExtractSettings, {"resize": "256"}, "params.yaml: extract")
