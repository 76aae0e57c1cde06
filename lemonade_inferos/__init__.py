"""lemonade_inferos: Infer-OS for the Lemonade LLM server.

The package tree is a picture of the architecture:

- ``engine/``     our ONNX Runtime prefill/decode loop, the og.Generator baseline, model folders and builds
- ``kvcache/``    the tiered, quantizing KV cache the engine reads and writes every step
- ``controller/`` the policy the plugin's PreRun hook applies
- ``cli/``        the ``inferos`` command
- ``bench/``      benchmarks that write JSON and a PNG
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# onnxruntime's PyPI builds write a device id and an event queue under ~/.cache/Microsoft/DeveloperTools when
# imported, and try to upload events: a local server sends nothing its user did not ask for (set it to 0 to opt in)
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
