"""Another process keeping a core busy, as on a desktop with a browser open: started and stopped by the bench."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def busy_core(settle_s: float = 0.5) -> Iterator[subprocess.Popen]:
    """A Python busy loop in its own process for the duration of the block (always stopped afterwards)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(settle_s)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
