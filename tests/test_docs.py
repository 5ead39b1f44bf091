"""The README and the documentation site: the site builds with no broken link, and the README's
demo table is the committed run's numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
# The README's demo rows name their feature source in backticks; these are its keys in metrics.json.
MIOU_KEYS = {"ddpm": "miou", "ddpm-refined": "miou_refined", "ddpm-paper-taps": "miou_paper_taps",
             "random": "miou_random_weights", "pixels": "miou_pixels", "synthetic": "miou_synthetic"}


def _demo_table() -> tuple[list[str], dict[str, list[str]]]:
    """The README's demo table: its class columns, and each source's cells (mIoU first)."""
    text = README.read_text()
    table = re.search(r"\[start:demo-table\] -->\n(.*?)<!--", text, re.DOTALL).group(1).strip().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        source = re.search(r"\(`([a-z-]+)`", cells[0]).group(1)
        rows[source] = cells[1:]
    return header[2:], rows


def test_the_readme_demo_table_is_the_committed_run():
    metrics = json.loads((PROJECT_ROOT / "data" / "metrics.json").read_text())
    per_class = json.loads((PROJECT_ROOT / "data" / "per_class_iou.json").read_text())
    classes, rows = _demo_table()
    assert classes == list(per_class)
    assert set(rows) == set(MIOU_KEYS)
    for source, cells in rows.items():
        key = source.replace("-", "_")
        expected = [metrics[MIOU_KEYS[source]]] + [per_class[name][key] for name in classes]
        assert cells == [f"{value:.3f}" for value in expected], source


def test_the_readme_is_an_entrance():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (PROJECT_ROOT / link).exists(), link


@pytest.mark.slow
def test_the_docs_site_builds_strictly(tmp_path):
    # --strict: a broken link, a missing page or picture, or a README section the pages include
    # that is gone fails the build; the CLI reference is generated from cli.py's commands.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "cli-reference" / "index.html").read_text()
    for command in ("extract", "train", "predict", "fewshot-train", "suggest"):
        assert f'id="segcache-{command}"' in reference, command
    assert (tmp_path / "site" / "data" / "results" / "ddpm" / "predictions.png").is_file()
