"""Which synthetic samples to keep: the official DatasetDDPM filter on the ensemble's uncertainty.

The official code drops 10 % of its samples: the most uncertain ones (the ensemble disagrees on
them, so their labels are likely wrong) and, as a small share, the least uncertain ones (30 of
10,000: near-empty or degenerate samples the ensemble is sure about). An image's uncertainty is
the mean of its top 10 % pixels' Jensen–Shannon disagreement (`metrics.top_decile_mean`).
"""

from __future__ import annotations

import numpy as np


def kept_samples(uncertainties: np.ndarray, filter_fraction: float, lowest_fraction: float) -> np.ndarray:
    """Which samples survive the filter.

    Args:
        uncertainties: float (N,), one score per sample.
        filter_fraction: share of the N samples dropped in all (0: keep every one).
        lowest_fraction: share of the N samples dropped from the least uncertain end (the official
            30 of 10,000 is 0.003); the rest of the dropped ones come from the most uncertain end.

    Returns:
        bool (N,): True for a kept sample. Ties are broken by sample order (stable sort).

    Raises:
        ValueError: fractions outside [0, 1), or more dropped from the bottom than in all.
    """
    if not 0 <= filter_fraction < 1 or not 0 <= lowest_fraction <= filter_fraction:
        raise ValueError(
            f"need 0 <= filter fraction < 1 and 0 <= lowest fraction <= filter fraction; got {filter_fraction}, {lowest_fraction}"
        )
    count = len(uncertainties)
    dropped_in_all = round(filter_fraction * count)
    dropped_lowest = min(round(lowest_fraction * count), dropped_in_all)
    order = np.argsort(np.asarray(uncertainties, dtype=np.float64), kind="stable")  # least uncertain first
    kept = np.ones(count, dtype=bool)
    kept[order[:dropped_lowest]] = False
    dropped_highest = dropped_in_all - dropped_lowest
    if dropped_highest:
        kept[order[count - dropped_highest:]] = False
    return kept
