"""Making a model folder ready to serve at once: the INT8 live form's graph patched and its scales calibrated.

Run when a model is built (``inferos model build``) or pulled, with progress, so a server that loads the folder
finds everything kept and never calibrates on a request's time (``live_forms.py`` says how the forms work).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import onnx

from lemonade_inferos.engine.graph import default_probe_layers, prepare_graph
from lemonade_inferos.engine.live_forms import Progress, calibrate_folder, known_scales
from lemonade_inferos.engine.model_folder import load_model_folder
from lemonade_inferos.engine.ort_engine import OrtEngine


def prepare_live_int8(path: str | Path, devices: list[str], progress: Progress = lambda done, total: None) -> str:
    """Make a model folder ready to serve the INT8 live form at once (``inferos model build``, ``pull``): its graph
    patched and its scales calibrated. Returns what was done, or why the form is not possible."""
    folder = load_model_folder(path)
    if prepare_graph(folder.onnx_path).kv_elem_type == onnx.TensorProto.INT8:
        return "its graph reads an INT8 past already"
    graph = prepare_graph(folder.onnx_path, int8_kv=True, head_size=folder.head_size)
    if graph.kv_int8_reason is not None:
        return f"INT8 live KV is not possible: {graph.kv_int8_reason}"

    with contextlib.suppress(ValueError):  # the server's graph too (probes rank blocks), where it can have them
        prepare_graph(folder.onnx_path, default_probe_layers(folder.num_layers, folder.local_layers), int8_kv=True,
                      head_size=folder.head_size)
    if known_scales(folder) is not None:
        return "INT8 live KV scales: already calibrated"
    started = time.perf_counter()
    calibrate_folder(folder, devices, OrtEngine, progress)
    return f"INT8 live KV scales calibrated in {time.perf_counter() - started:.1f} s"
