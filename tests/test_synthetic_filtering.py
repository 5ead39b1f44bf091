"""The DatasetDDPM uncertainty filter."""

import numpy as np
import pytest

from pipeline.synthetic.filtering import kept_samples


def test_drops_the_most_uncertain_and_a_few_of_the_least():
    uncertainties = np.arange(1000, dtype=float)[::-1]  # sample 999 is the least uncertain
    kept = kept_samples(uncertainties, 0.1, 0.003)
    assert kept.sum() == 900
    assert not kept[:97].any()  # the 97 most uncertain (values 999..903)
    assert not kept[-3:].any()  # the 3 least uncertain
    assert kept[97:-3].all()


def test_the_official_ratio_at_the_official_count():
    rng = np.random.default_rng(0)
    uncertainties = rng.random(10000)
    kept = kept_samples(uncertainties, 0.1, 0.003)
    order = np.argsort(uncertainties)
    assert kept.sum() == 9000 and not kept[order[:30]].any() and not kept[order[-970:]].any()


def test_no_filter_keeps_everything_and_ties_break_by_order():
    assert kept_samples(np.ones(7), 0.0, 0.0).all()
    kept = kept_samples(np.ones(10), 0.2, 0.0)
    assert kept.tolist() == [True] * 8 + [False] * 2


@pytest.mark.parametrize("fraction, lowest", [(1.0, 0.0), (-0.1, 0.0), (0.1, 0.2)])
def test_bad_fractions_are_refused(fraction, lowest):
    with pytest.raises(ValueError, match="filter fraction"):
        kept_samples(np.ones(5), fraction, lowest)
