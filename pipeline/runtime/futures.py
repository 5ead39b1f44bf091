"""Waiting for work handed to a thread pool: every result, or the first failure once nothing
of it is still running."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence


def results_in_order(futures: Sequence[concurrent.futures.Future]) -> list:
    """Waits for `futures`; returns their results, in order.

    A failure cancels those not yet started and raises once the running ones have ended, so none
    is left working behind the caller (a store writer's threads, a half-written image); of
    several failures, the earliest future's error is raised.
    """
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    if any(_failure(future) for future in futures):
        for future in futures:
            future.cancel()  # only those still queued
        concurrent.futures.wait(futures)
        raise next(error for error in map(_failure, futures) if error is not None)
    return [future.result() for future in futures]


def _failure(future: concurrent.futures.Future) -> BaseException | None:
    """The error of a finished future; None while it runs, when it succeeded or was cancelled."""
    return future.exception() if future.done() and not future.cancelled() else None
