"""The INT8 live form's per-channel scales: from the folder, from the graph, or calibrated once and kept.

GroupQueryAttention with an INT8 past stores ``clip(rint(x / scale), -128, 127)`` per channel (head x head
dimension) and layer, with scales that are fixed for the model. They come, in order, from:

1. the graph itself, when it already reads an INT8 past (``inferos model build --kv int8``: initializers);
2. the folder's own scale file (``kv_cache_scales.json``, onnxruntime-genai's calibration format:
   ``{"scales": {"k_scales": [...], "v_scales": [...]}}`` per layer, optional ``qmax``);
3. a calibration pass at first load: passages of CPython's ``pydoc_data.topics`` (second half, never what
   ``inferos eval ppl`` scores) run through the model's own float form; per channel the largest |x| over every
   token (measured on SmolLM2-135M, 2048 tokens: the 99.99th and 99.9th percentiles give the same KLD, 0.0016-0.0017,
   and a larger |ΔPPL|, 0.021 and 0.025 against 0.013), keys on the rotation-invariant pair envelope ``sqrt(k_i^2 + k_{i+D/2}^2)`` so a key keeps
   its range at any RoPE position (re-indexing rotates keys; a pair's envelope does not change). The result is
   written to ``INFEROS_HOME/calibration/live-int8/`` with the model's fingerprint, and a second load reuses it.

Out-of-range values saturate (the kernel clips; so does :meth:`StaticKVScales.quantize`): only values larger than
any the calibration saw, and ``inferos eval ppl`` reports the share of saturated codes (docs/kv-cache.md).
The calibration also measures what the live form costs on a held-out passage (ΔNLL against the float form), kept
with the scales: the quality guard adds it to the shadow pass's estimate, which compares plans within one form.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from lemonade_inferos.durable import atomic_write, read_json_object
from lemonade_inferos.engine.kv import StaticKVScales
from lemonade_inferos.paths import inferos_home

log = logging.getLogger(__name__)

FOLDER_SCALE_FILE = "kv_cache_scales.json"
CALIBRATION_VERSION = 1
PERCENTILE = 100.0
QMAX = 127.0
CALIBRATION_PASSAGES = 12
CALIBRATION_TOKENS = 512   # per passage


@dataclass(frozen=True)
class Calibration:
    scales: StaticKVScales
    delta_nll: float | None   # the live form's cost on a held-out passage, nats per token (None: not measured)
    saturated: float | None   # share of calibration values beyond the range


def scales_from_lists(k_scales: list, v_scales: list, heads: int, head_size: int, source: str,
                      factor: float = 1.0) -> StaticKVScales:
    """Per-layer flat scale lists -> :class:`StaticKVScales`, validated (finite, positive, the right size)."""
    keys = np.asarray(k_scales, dtype=np.float64) * factor
    values = np.asarray(v_scales, dtype=np.float64) * factor
    shape = (len(keys), heads * head_size)
    if keys.shape != shape or values.shape != shape:
        raise ValueError(f"scales have shapes {keys.shape} / {values.shape}, expected {shape}")
    if not (np.isfinite(keys).all() and np.isfinite(values).all() and (keys > 0).all() and (values > 0).all()):
        raise ValueError("scales must be finite and positive")
    keys32 = keys.astype(np.float32).reshape(len(keys), heads, 1, head_size)
    values32 = values.astype(np.float32).reshape(len(values), heads, 1, head_size)
    digest = hashlib.blake2b(keys32.tobytes() + values32.tobytes(), digest_size=8).hexdigest()
    return StaticKVScales(keys32, values32, source, digest)


def graph_scales(onnx_path: Path, heads: int, head_size: int) -> StaticKVScales | None:
    """The scales of a graph that already reads an INT8 past (initializers at GroupQueryAttention inputs 12/13)."""
    from lemonade_inferos.engine.model_folder import initializer_array

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    keys, values = [], []
    for node in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
        if len(node.input) < 14 or node.input[12] not in inits or node.input[13] not in inits:
            return None
        keys.append(initializer_array(inits[node.input[12]], onnx_path.parent).reshape(-1))
        values.append(initializer_array(inits[node.input[13]], onnx_path.parent).reshape(-1))
    if not keys:
        return None
    return scales_from_lists(keys, values, heads, head_size, "graph initializers")


def folder_scales(folder: Path, heads: int, head_size: int) -> StaticKVScales | None:
    """The folder's own scale file, or None when it has none.

    Raises:
        ValueError: the file is there but unusable (named in the message).
    """
    path = folder / FOLDER_SCALE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        data = data.get("model", data) if "scales" not in data else data
        qmax = float(data.get("qmax", QMAX))
        return scales_from_lists(data["scales"]["k_scales"], data["scales"]["v_scales"], heads, head_size,
                                 f"folder scale file {path.name}", factor=qmax / QMAX)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a usable KV scale file ({exc})") from exc


def calibration_path(fingerprint: str) -> Path:
    digest = hashlib.blake2b(f"{fingerprint}|v{CALIBRATION_VERSION}".encode(), digest_size=12).hexdigest()
    return inferos_home() / "calibration" / "live-int8" / f"{digest}.json"


def load_calibration(fingerprint: str, heads: int, head_size: int) -> Calibration | None:
    """A calibration written earlier for this model (same fingerprint and version), or None."""
    path = calibration_path(fingerprint)
    data = read_json_object(path)
    if data is None or data.get("fingerprint") != fingerprint or data.get("version") != CALIBRATION_VERSION:
        return None
    try:
        scales = scales_from_lists(data["k_scales"], data["v_scales"], heads, head_size, "calibrated (reused)")
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: ignoring a damaged calibration (%s); calibrating again", path, exc)
        return None
    return Calibration(scales, data.get("delta_nll"), data.get("saturated"))


def calibrate(forward: Callable[[list[int]], list[tuple[np.ndarray, np.ndarray]]], passages: list[list[int]],
              heads: int, head_size: int, progress: Callable[[int, int], None] = lambda done, total: None
              ) -> tuple[StaticKVScales, float]:
    """Scales from the K/V the float form writes for ``passages``.

    ``forward(ids)`` returns per layer the ``[H, T, D]`` keys and values of a fresh cache after ``ids``;
    ``progress(done, total)`` is called after each passage. Returns the scales and the share of calibration values
    that fall beyond them.
    """
    per_layer_k: list[list[np.ndarray]] = []
    per_layer_v: list[list[np.ndarray]] = []
    for index, ids in enumerate(passages):
        progress(index, len(passages))
        for layer, (keys, values) in enumerate(forward(ids)):
            if layer == len(per_layer_k):
                per_layer_k.append([])
                per_layer_v.append([])
            half = head_size // 2
            envelope = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)     # [H, T, D/2]
            per_layer_k[layer].append(np.concatenate([envelope, envelope], axis=-1))
            per_layer_v[layer].append(np.abs(values))
    progress(len(passages), len(passages))
    k_scales, v_scales, beyond, total = [], [], 0, 0
    for ks, vs in zip(per_layer_k, per_layer_v):
        for group, out in ((np.concatenate(ks, axis=1), k_scales), (np.concatenate(vs, axis=1), v_scales)):
            threshold = np.maximum(np.percentile(group, PERCENTILE, axis=1), 1e-6)      # [H, D]
            out.append((threshold / QMAX).reshape(-1))
            beyond += int((group > threshold[:, None, :]).sum())
            total += group.size
    return scales_from_lists(k_scales, v_scales, heads, head_size, "calibrated"), beyond / max(total, 1)


def save_calibration(fingerprint: str, calibration: Calibration) -> Path:
    path = calibration_path(fingerprint)
    scales = calibration.scales
    layers = scales.keys.shape[0]
    atomic_write(path, json.dumps({
        "version": CALIBRATION_VERSION, "fingerprint": fingerprint, "percentile": PERCENTILE,
        "k_scales": scales.keys.reshape(layers, -1).tolist(), "v_scales": scales.values.reshape(layers, -1).tolist(),
        "delta_nll": calibration.delta_nll, "saturated": calibration.saturated}).encode())
    return path


def describe(calibration: Calibration | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {"source": calibration.scales.source, "fingerprint": calibration.scales.fingerprint,
            "delta_nll": calibration.delta_nll, "saturated_share": calibration.saturated}
