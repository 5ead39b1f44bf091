"""Package metadata (pyproject.toml): dependencies match requirements.txt, the `segcache` console
script is cli.py's click group, and a wheel holds the code and nothing else."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cli
import pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _requirements_txt() -> list[Requirement]:
    """requirements.txt's lines as requirements, comments and blank lines skipped."""
    lines = (line.split("#")[0].strip() for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _names(requirements) -> list[str]:
    return sorted(canonicalize_name(Requirement(str(requirement)).name) for requirement in requirements)


def _help_commands(help_text: str) -> set[str]:
    """The command names under "Commands:" in click's --help output."""
    section = help_text.split("Commands:", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.strip()}


def test_pyproject_requires_the_packages_of_requirements_txt():
    project = _pyproject()["project"]
    # Runtime packages in `dependencies`; the DVC and test tools in extras: together, requirements.txt.
    extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
    assert _names(project["dependencies"] + extras) == _names(_requirements_txt())
    # The same extras ([array], [s3]) as the pins, and lower bounds only, no exact pins.
    pinned_extras = {canonicalize_name(r.name): r.extras for r in _requirements_txt()}
    for requirement in map(Requirement, project["dependencies"] + extras):
        assert requirement.extras == pinned_extras[canonicalize_name(requirement.name)], requirement
        assert all(spec.operator == ">=" for spec in requirement.specifier), requirement
    # torch is a runtime dependency, without a local build tag such as +cu121 or +cpu.
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert "+" not in str(torch.specifier)


def test_version_is_pipeline_version():
    project = _pyproject()
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}
    assert pipeline.__version__.count(".") == 2  # e.g. "0.1.0"


def test_console_script_is_the_cli_group():
    module_name, attribute = _pyproject()["project"]["scripts"]["segcache"].split(":")
    command = getattr(importlib.import_module(module_name), attribute)
    assert command is cli.main
    assert isinstance(command, click.Group)
    # `segcache --help` lists the same commands as `python cli.py --help`.
    result = CliRunner().invoke(command, ["--help"], prog_name="segcache")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: segcache ")
    assert _help_commands(result.output) == set(cli.main.commands)
    assert {"extract", "train", "evaluate", "predict", "benchmark"} <= set(cli.main.commands)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once for this module's tests."""
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the `wheel` package
    tmp_path = tmp_path_factory.mktemp("wheel")
    # Build from a copy: pip builds in the source folder (build/, *.egg-info), and the copy
    # keeps the checkout clean. tests/, bench/ and a data/ package come along so that the
    # package list in pyproject.toml has something to leave out.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for name in ("pipeline", "stages", "tests", "bench"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "data").mkdir()
    (source / "data" / "__init__.py").write_text("")

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "-w", str(tmp_path / "wheel"), str(source)],
        check=False, capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = (tmp_path / "wheel").glob("segcache-*.whl")
    return built


def test_wheel_holds_the_code_only(wheel):
    assert wheel.name.startswith(f"segcache-{pipeline.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()

    assert "cli.py" in names
    assert "pipeline/__init__.py" in names
    assert "pipeline/store/writer.py" in names  # subpackages too
    assert "stages/__init__.py" in names
    assert {"pipeline/data/preset_files/ffhq_34.yaml", "pipeline/data/preset_files/features/sd21-dift.yaml",
            "pipeline/data/preset_files/fewshot/coco_20i.yaml"} <= set(names)
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"cli.py", "pipeline", "stages", f"segcache-{pipeline.__version__}.dist-info"}
    entry_points = zipfile.ZipFile(wheel).read(f"segcache-{pipeline.__version__}.dist-info/entry_points.txt")
    assert "segcache = cli:main" in entry_points.decode()


def test_an_installed_wheel_finds_the_presets(wheel, tmp_path):
    """The presets are package data: the wheel's files alone, away from the checkout, list and
    read them (`segcache benchmark --preset` after `pip install segcache-….whl`)."""
    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)  # what pip install puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import pipeline.data.presets as presets; "
        f"assert presets.__file__.startswith({str(installed)!r}), presets.__file__; "
        "print(presets.preset_names(), presets.feature_preset_names(), presets.fewshot_preset_names(), "
        "presets.load_preset('ffhq_34').num_classes, presets.load_fewshot_preset('coco_20i').folds)"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env={"PYTHONPATH": str(installed)},
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == (
        "['ade_bedroom_30', 'bedroom_28', 'cat_15', 'celeba_19', 'ffhq_34', 'horse_21'] ['sd21-dift'] "
        "['coco_20i', 'lvis_92i', 'pascal_5i'] 34 4"
    )
