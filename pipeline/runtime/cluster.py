"""A client of a Dask distributed cluster, or none: what every command with `--scheduler` opens.

Kept apart from the extraction's cluster code (pipeline/extraction/dask_runner.py) so that training,
which only needs a client, does not import the model code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import distributed

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def cluster_client(address: str | None) -> Iterator[distributed.Client | None]:
    """A client of the Dask scheduler at `address` for the body, or None when `address` is None.

    Raises:
        ValueError: when no scheduler answers at `address`.
    """
    if address is None:
        yield None
        return
    try:
        client = distributed.Client(address)  # waits distributed.comm.timeouts.connect (30 s) for it
    except OSError as error:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {error}") from None
    with client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        logger.info("connected to the Dask scheduler at %s (%d workers)", address, len(workers))
        yield client


def shared_value(client: distributed.Client, value) -> distributed.Future:
    """`value` on the cluster for many tasks to take as an argument, sent to each worker once.

    A task's result rather than scattered data: the scheduler keeps one copy of either (its
    memory manager drops extra replicas), and when that worker dies a result is recomputed
    while scattered data is lost for good, cancelling every task that needs it ("already
    forgotten").
    """
    return client.submit(_identity, value, pure=False)


def _identity(value):
    return value
