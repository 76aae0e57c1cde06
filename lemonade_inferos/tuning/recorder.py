"""``--inferos-record FILE``: the server writes down what it serves, as a workload to replay (``workload.py``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from lemonade_inferos.hooktypes import InferenceContext

log = logging.getLogger(__name__)


class WorkloadRecorder:
    """Appends one JSON line per generate call; a write error is logged once and never fails a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: set[Path] = set()

    def record(self, path: Path, context: InferenceContext) -> None:
        line = json.dumps({"time": time.time(), "model": context.model, "endpoint": context.endpoint,
                           "prompt_ids": context.prompt_ids, "max_tokens": context.max_tokens,
                           "sampling": context.sampling})
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
        except OSError as exc:
            if path not in self._failed:
                self._failed.add(path)
                log.warning("cannot record requests to %s: %s", path, exc)
