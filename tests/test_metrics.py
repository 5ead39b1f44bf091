import numpy as np
import pytest

from pipeline.metrics import IoUAccumulator, top_decile_mean


def test_iou_is_accumulated_over_images_not_averaged_per_image():
    accumulator = IoUAccumulator(num_classes=2, ignore_label=255)
    # Image 1: class 1 fully right on 1 pixel of 1. Image 2: class 1 predicted on 3 pixels, true on 1.
    accumulator.update(np.array([[1, 0]]), np.array([[1, 0]]))
    accumulator.update(np.array([[1, 1, 1, 0]]), np.array([[1, 0, 0, 0]]))
    # Class 1: intersections 1 + 1 = 2, unions 1 + 3 = 4 → 0.5 (per-image mean would be 0.667).
    # Class 0: intersections 1 + 1 = 2, unions 1 + 3 = 4 → 0.5.
    np.testing.assert_allclose(accumulator.per_class_iou(), [0.5, 0.5])
    assert accumulator.mean_iou() == pytest.approx(0.5)
    assert accumulator.pixel_accuracy() == pytest.approx(4 / 6)


def test_ignored_pixels_count_against_the_predicted_class_under_the_paper_definition():
    accumulator = IoUAccumulator(num_classes=3, ignore_label=255)
    predicted = np.array([[0, 1, 2, 2, 1]])
    target = np.array([[0, 1, 255, 255, 255]])
    accumulator.update(predicted, target)
    # Paper: class 1's union holds the ignored pixel predicted 1; class 2 (never true) scores 0.
    np.testing.assert_allclose(accumulator.per_class_iou("paper"), [1.0, 0.5, 0.0])
    assert accumulator.mean_iou("paper") == pytest.approx(0.5)
    # Ignore excluded: ignored pixels count nowhere; class 2 has an empty union and is left out.
    iou = accumulator.per_class_iou("ignore_excluded")
    assert iou[0] == 1.0 and iou[1] == 1.0 and np.isnan(iou[2])
    assert accumulator.mean_iou("ignore_excluded") == 1.0
    assert accumulator.pixel_accuracy() == 1.0


def test_a_class_absent_everywhere_scores_zero_in_the_paper_mean():
    accumulator = IoUAccumulator(num_classes=3, ignore_label=255)
    accumulator.update(np.array([[0, 1]]), np.array([[0, 1]]))
    assert accumulator.per_class_iou("paper")[2] == 0.0
    assert accumulator.mean_iou("paper") == pytest.approx(2 / 3)
    assert accumulator.mean_iou("ignore_excluded") == 1.0


def test_ignore_label_that_is_a_class_is_never_scored():
    accumulator = IoUAccumulator(num_classes=3, ignore_label=0)
    accumulator.update(np.array([[1, 2, 1, 0]]), np.array([[1, 2, 2, 0]]))
    assert accumulator.scored_classes().tolist() == [1, 2]
    for definition in ("paper", "ignore_excluded"):
        iou = accumulator.per_class_iou(definition)
        assert np.isnan(iou[0])
        # Pixel 4 (label 0) predicted 0 counts nowhere; class 1: ∩1 ∪2, class 2: ∩1 ∪2.
        assert iou[1] == pytest.approx(1 / 2) and iou[2] == pytest.approx(1 / 2)
        assert accumulator.mean_iou(definition) == pytest.approx(1 / 2)


def test_predictions_of_the_ignore_class_on_ignored_pixels_count_nowhere():
    accumulator = IoUAccumulator(num_classes=3, ignore_label=0)
    accumulator.update(np.array([[1, 2, 1, 1]]), np.array([[1, 2, 0, 0]]))
    np.testing.assert_allclose(accumulator.per_class_iou("paper")[1:], [1 / 3, 1.0])
    np.testing.assert_allclose(accumulator.per_class_iou("ignore_excluded")[1:], [1.0, 1.0])


def test_hand_computed_three_class_case():
    accumulator = IoUAccumulator(num_classes=3, ignore_label=255)
    predicted = np.array([[0, 0, 1], [1, 2, 2], [2, 2, 0]])
    target = np.array([[0, 1, 1], [1, 1, 2], [2, 0, 0]])
    accumulator.update(predicted, target)
    # class 0: P={0,1,8} G={0,7,8}: ∩2 ∪4; class 1: P={2,3} G={1,2,3,4}: ∩2 ∪4; class 2: P={4,5,6,7} G={5,6}: ∩2 ∪4
    np.testing.assert_allclose(accumulator.per_class_iou(), [0.5, 0.5, 0.5])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        IoUAccumulator(2, 255).update(np.zeros((2, 2)), np.zeros((3, 3)))


def test_top_decile_mean():
    values = np.arange(100, dtype=np.float32)  # top 10 are 90..99
    assert top_decile_mean(values) == pytest.approx(94.5)
    assert top_decile_mean(np.arange(25.0)) == pytest.approx(23.5)  # int(25 / 10) = 2 values
    # Fewer than 10 values: the official slice [-0:] takes all of them.
    assert top_decile_mean(np.array([3.0, 1.0])) == 2.0
