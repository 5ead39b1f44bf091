"""Smoke test: the benchmarks that run in-process work in quick mode and feed the summary table.

(training_memory, evaluation_streaming and dvc_overhead measure fresh child processes; they
are exercised by `python -m bench --quick`.)
"""

import json

import pytest

from bench import extraction_overhead, sampling_throughput, storage_codecs, training_speed
from bench.common import write_result
from bench.report import summary_table


@pytest.mark.parametrize(
    "module", [storage_codecs, extraction_overhead, training_speed, sampling_throughput], ids=lambda module: module.__name__
)
def test_quick_benchmark_writes_a_result_the_summary_can_read(tmp_path, module):
    name = module.__name__.split(".")[-1]
    result = module.run(True, tmp_path / "scratch")
    path = write_result(name, result, tmp_path / "results")
    written = json.loads(path.read_text())
    assert "caveat" in written["environment"]
    table = summary_table(tmp_path / "results")
    assert "incomplete result" not in table and f"| {name} | not measured" not in table
