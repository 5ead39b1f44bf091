import concurrent.futures
import threading
import time

import pytest

from pipeline.runtime.futures import results_in_order


def test_a_failure_drops_the_queued_ones_and_the_earliest_error_wins():
    started, release = [], threading.Event()

    def write(index):
        started.append(index)
        if index == 1:
            release.wait(5)  # still running when image 0 fails
            raise OSError(28, f"disk full at image {index}")
        if index == 0:
            raise OSError(28, f"disk full at image {index}")
        time.sleep(0.1)  # a write that takes its time: images 3 and 4 are still queued when 0 fails

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        writes = [pool.submit(write, index) for index in range(5)]
        threading.Timer(0.2, release.set).start()
        with pytest.raises(OSError, match="image 0"):
            results_in_order(writes)
        assert all(write.done() for write in writes)  # none left writing behind the caller
    assert [write.cancelled() for write in writes] == [False, False, False, True, True] and started == [0, 1, 2]


def test_results_come_in_the_order_of_the_futures():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert results_in_order([pool.submit(lambda value=value: value) for value in range(3)]) == [0, 1, 2]
