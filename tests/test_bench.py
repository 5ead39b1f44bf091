"""Smoke test: the benchmarks that run in-process work in quick mode and feed the summary table.

(training_memory, evaluation_streaming and dvc_overhead measure fresh child processes; they
are exercised by `python -m bench --quick`.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import (
    extraction_gpu,
    extraction_gpu_rate,
    extraction_overhead,
    fast_protocol_classes,
    inference_speed,
    latent_extraction,
    pretrain_speed,
    refine_speed,
    sampling_throughput,
    segmenter_speed,
    storage_codecs,
    training_speed,
)
from bench.common import PROJECT_ROOT, RESULTS_DIR, current_rss_bytes, write_result
from bench.report import summary_table


@pytest.mark.parametrize(
    "module",
    [storage_codecs, extraction_overhead, extraction_gpu_rate, extraction_gpu, latent_extraction, training_speed, fast_protocol_classes, inference_speed,
     refine_speed, sampling_throughput, pretrain_speed, segmenter_speed],
    ids=lambda module: module.__name__,
)
def test_quick_benchmark_writes_a_result_the_summary_can_read(tmp_path, module):
    name = module.__name__.split(".")[-1]
    result = module.run(True, tmp_path / "scratch")
    path = write_result(name, result, tmp_path / "results")
    written = json.loads(path.read_text())
    assert "caveat" in written["environment"]
    table = summary_table(tmp_path / "results")
    assert "incomplete result" not in table and f"| {name} | not measured" not in table


def test_committed_results_fill_every_row_of_the_summary():
    table = summary_table(RESULTS_DIR)
    assert "incomplete result" not in table and "not measured" not in table


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_child_reports_its_own_peak_not_its_parents():
    # ru_maxrss of a subprocess starts at the parent's RSS; the child must not report that.
    held = np.ones(300 << 20, dtype=np.uint8)  # 300 MB resident here
    child = subprocess.run(
        [sys.executable, "-c", "from bench.common import peak_rss_bytes; print(peak_rss_bytes())"],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True, check=True,
    )
    assert int(child.stdout) < current_rss_bytes() - held.nbytes // 2
