"""mkdocs hook: the docs site reads two things from outside docs/.

- The pictures the pages show from `data/` (the demo's outputs, which DVC re-makes where the
  pipeline writes them): each `data/….png` a page names is served at the same path, so a page
  can never show a stale copy, and a picture that no longer exists is a broken link that
  `mkdocs build --strict` reports.
- `cli.py`, which the CLI reference page imports (mkdocs-click renders each command's own
  `--help`): the project root goes on `sys.path`, whatever directory mkdocs runs from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_PICTURE = re.compile(r"""(?:\]\(|src=")(data/[^)"\s]+\.png)""")


def on_config(config):
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return config


def on_files(files, config):
    named = set()
    for page in Path(config["docs_dir"]).rglob("*.md"):
        named.update(DATA_PICTURE.findall(page.read_text()))
    for path in sorted(named):
        if (PROJECT_ROOT / path).is_file():
            files.append(File(path, str(PROJECT_ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
