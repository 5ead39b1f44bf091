"""Named points where a test can freeze this process, to `kill -9` it exactly there.

The kill-and-resume tests (tests/test_reliability.py) start a stage with the environment
variables `SEGCACHE_PAUSE_AT=<point>` and `SEGCACHE_PAUSE_MARKER=<file>`. When the process
reaches that point it writes the marker file and stops itself (SIGSTOP: every thread at once, so
the other image written beside this one goes no further either) until the test kills it, so
"killed halfway through writing image 2" is a moment a test can hit every time. Outside those
tests the variables are unset and a pause point costs one environment lookup.

Points in use: `write-image-begin:<i>`, `write-image-features-written:<i>` and
`write-image-done:<i>` (pipeline/store/writer.py); `pretrain-state-staged:<step>` and
`pretrain-checkpoint-saved:<step>` (pipeline/pretrain/ddpm.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PAUSE_AT = "SEGCACHE_PAUSE_AT"
PAUSE_MARKER = "SEGCACHE_PAUSE_MARKER"
PAUSE_SECONDS = 300  # a backstop: the test kills the process long before


def pause_point(name: str, number: int) -> None:
    """Freezes the process at `<name>:<number>` when a test asked for that point."""
    wanted = os.environ.get(PAUSE_AT)
    if wanted is None or wanted != f"{name}:{number}":
        return
    Path(os.environ[PAUSE_MARKER]).write_text(wanted)
    if hasattr(signal, "SIGSTOP"):
        os.kill(os.getpid(), signal.SIGSTOP)  # continues here only if someone sends SIGCONT
    else:  # Windows: only this thread waits
        time.sleep(PAUSE_SECONDS)
    raise SystemExit(f"pause point {wanted} was never killed")
