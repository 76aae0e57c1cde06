"""The live KV forms of one model: the graph in its own KV dtype, and the INT8 live form.

A cache's layout says which form reads it (``KVLayout.scales`` set: INT8 codes with static per-channel scales;
else the model's dtype), so one engine serves both at once: requests whose plan keeps KV in INT8 while it runs,
and the quality guard's full-precision step, scoring references and ``kv.mode: disabled`` on the float graph.
Each form is an ONNX Runtime session loaded on first use. The calibration that makes the INT8 form (see
``kv_scales.py``) needs the float graph, so it runs in a child process of its own the first time a model is seen:
the serving process never holds both graphs for it (memory a process has held is not given back).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from lemonade_inferos.corpus import calibration_passages
from lemonade_inferos.engine import kv_scales
from lemonade_inferos.engine.graph import PreparedGraph, prepare_graph
from lemonade_inferos.engine.kv import DenseKVCache, KVLayout

if TYPE_CHECKING:
    from lemonade_inferos.engine.ort_engine import OrtEngine

log = logging.getLogger(__name__)

KV_DTYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16),
             onnx.TensorProto.INT8: np.dtype(np.int8)}


@dataclass
class LoadedForm:
    """One session of the model and the scale inputs it needs bound (the patched INT8 graph's)."""

    session: ort.InferenceSession
    graph: PreparedGraph
    layout: KVLayout
    scale_values: list[tuple[str, ort.OrtValue]]


CALIBRATE_IN_CHILD = True      # False inside the calibration process itself
CALIBRATION_TIMEOUT_S = 900


def _calibrate_child(folder: str, devices: list[str], queue: Any) -> None:
    """The calibration process: load the model with the INT8 live form, which calibrates and keeps the scales."""
    global CALIBRATE_IN_CHILD
    CALIBRATE_IN_CHILD = False
    from lemonade_inferos.engine.ort_engine import OrtEngine
    from lemonade_inferos.engine.session import SessionPolicy

    try:
        engine = OrtEngine(folder, SessionPolicy(devices=devices, kv_cache="int8"))
        reason = engine.live_kv_report()["int8_unavailable_reason"]
        queue.put(reason)
    except Exception as exc:  # reported to the serving process, which keeps its float form
        queue.put(f"{type(exc).__name__}: {exc}")


def _answer(queue: Any, child: Any, timeout_s: float) -> str | None:
    """The calibration process's answer (None: success, else its error); a process that exits without one or
    outlives ``timeout_s`` is an error, found within a second."""
    import queue as queues

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            if not child.is_alive():
                raise ValueError(f"the calibration process exited with code {child.exitcode} and no answer")
    raise ValueError(f"the calibration process gave no answer in {timeout_s:.0f} s")


class LiveForms:
    def __init__(self, engine: "OrtEngine", graph: PreparedGraph) -> None:
        self.engine = engine
        self._graphs: dict[bool, PreparedGraph] = {False: graph}
        self._loaded: dict[tuple[bool, str], LoadedForm] = {}   # (INT8?, phase) -> its session
        self._lock = threading.RLock()
        self.calibration: kv_scales.Calibration | None = None
        self.int8_reason: str | None = None
        folder = engine.folder
        self.model_layout = KVLayout(num_layers=folder.num_layers, num_kv_heads=folder.num_kv_heads,
                                     head_size=folder.head_size, max_tokens=self._max_tokens(),
                                     dtype=KV_DTYPES.get(graph.kv_elem_type, np.dtype(np.float32)))
        self.int8_layout: KVLayout | None = None
        self._int8_tried = False
        if self.model_layout.dtype == np.int8:  # the folder's graph already reads an INT8 past
            scales = kv_scales.graph_scales(folder.onnx_path, folder.num_kv_heads, folder.head_size)
            self.model_layout = replace(self.model_layout, scales=scales)
            self.int8_reason = "the model's own graph reads an INT8 past" + \
                ("" if scales else " with scales the engine cannot read (its cache cannot be tiered)")
            self.calibration = kv_scales.Calibration(scales, None, None) if scales else None

    # -- which form -----------------------------------------------------------------------------------
    def default_layout(self, kv_cache: str) -> KVLayout:
        if kv_cache == "int8":
            self._make_int8()
        return self.layout_for(kv_cache)

    def layout_for(self, live_kv: str) -> KVLayout:
        if live_kv == "int8":
            self._make_int8()
            if self.int8_layout is not None:
                return self.int8_layout
        return self.model_layout

    def form(self, layout: KVLayout, phase: str = "prefill") -> LoadedForm:
        """The session reading caches of ``layout`` in ``phase`` (decode has its own only under the hybrid
        scheduler)."""
        int8 = self.int8_layout is not None and layout.scales == self.int8_layout.scales
        key = (int8, phase if self.engine.policy.hybrid else "prefill")
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(*key)
            return self._loaded[key]

    def session_for(self, layout: KVLayout) -> ort.InferenceSession:
        return self.form(layout).session

    def describe(self) -> dict[str, Any]:
        default = self.engine.layout if hasattr(self.engine, "layout") else self.model_layout
        return {"live_kv": "int8" if default.live_int8 else str(default.dtype),
                "model_kv_dtype": str(self.model_layout.dtype),
                "int8_available": self.int8_layout is not None or self.model_layout.live_int8,
                "int8_unavailable_reason": None if self.int8_layout is not None else self.int8_reason,
                "scales": kv_scales.describe(self.calibration),
                "loaded_forms": sorted({"int8" if int8 else "model" for int8, _ in self._loaded}),
                "loaded_sessions": sorted(f"{'int8' if int8 else 'model'}:{phase}" for int8, phase in self._loaded)}

    # -- loading ---------------------------------------------------------------------------------------
    def _max_tokens(self) -> int:
        engine = self.engine
        return min(engine.context_length or engine.folder.context_length, engine.folder.context_length)

    def _load(self, int8: bool, phase: str) -> LoadedForm:
        engine = self.engine
        graph = self._graphs[int8]
        layout = self.int8_layout if int8 else self.model_layout
        assert layout is not None, "loading the INT8 form before it was made: this indicates a bug"
        options, report = engine.session_options(phase)
        session = ort.InferenceSession(graph.model, options, providers=report.providers)
        values = []
        if int8 and graph.kv_scale_inputs:
            scales = layout.scales
            for layer, (key_name, value_name) in enumerate(graph.kv_scale_inputs):
                values.append((key_name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
                    scales.keys[layer].reshape(-1)))))
                values.append((value_name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
                    scales.values[layer].reshape(-1)))))
        return LoadedForm(session, graph, layout, values)

    def _make_int8(self) -> None:
        """Patch the graph for the INT8 live form and find its scales; on failure the reason is kept and the model's
        form serves."""
        with self._lock:
            if not self._int8_tried:
                self._int8_tried = True
                if not self.model_layout.live_int8:
                    self._patch_and_calibrate()

    def _patch_and_calibrate(self) -> None:
        engine = self.engine
        graph = prepare_graph(engine.folder.onnx_path, engine._probe_layers, int8_kv=True)
        if graph.kv_int8_reason is not None:
            self.int8_reason = graph.kv_int8_reason
            return
        self._graphs[True] = graph
        had_model_form = any(not int8 for int8, _ in self._loaded)
        try:
            self.calibration = self._calibration()
        except Exception as exc:  # no scales means no INT8 form, never a failed request: the float form serves
            self.int8_reason = f"no INT8 scales: {type(exc).__name__}: {exc}"
            log.warning("%s: INT8 live KV off (%s)", engine.folder.path, self.int8_reason,
                        exc_info=not isinstance(exc, (ValueError, OSError)))
            self.int8_layout = None
            for key in [k for k in self._loaded if k[0]]:
                del self._loaded[key]
            return
        finally:
            if not had_model_form:  # the float form was only needed to calibrate
                for key in [k for k in self._loaded if not k[0]]:
                    del self._loaded[key]
        self.int8_layout = replace(self.model_layout, dtype=np.dtype(np.int8), scales=self.calibration.scales)
        log.info("%s: INT8 live KV with scales from %s (%s)", engine.folder.path, self.calibration.scales.source,
                 kv_scales.describe(self.calibration))

    def _calibration(self) -> kv_scales.Calibration:
        folder = self.engine.folder
        heads, head_size = folder.num_kv_heads, folder.head_size
        scales = kv_scales.folder_scales(folder.path, heads, head_size)
        if scales is not None:
            return kv_scales.Calibration(scales, None, None)
        fingerprint = folder.fingerprint
        found = kv_scales.load_calibration(fingerprint, heads, head_size)
        if found is not None:
            return found
        if CALIBRATE_IN_CHILD:
            return self._calibrate_in_child(fingerprint)
        started = time.perf_counter()
        passages = self._passages(kv_scales.CALIBRATION_PASSAGES + 1)
        scales, saturated = kv_scales.calibrate(self._float_kv, passages[:-1], heads, head_size)
        self.int8_layout = replace(self.model_layout, dtype=np.dtype(np.int8), scales=scales)
        calibration = kv_scales.Calibration(scales, self._live_delta_nll(passages[-1]), saturated)
        path = kv_scales.save_calibration(fingerprint, calibration)
        log.info("calibrated INT8 live KV scales for %s in %.1f s (kept in %s)", folder.path,
                 time.perf_counter() - started, path)
        return calibration

    def _calibrate_in_child(self, fingerprint: str) -> kv_scales.Calibration:
        """Calibrate in a fresh process: it loads the float graph beside the INT8 one, and memory a process has
        held is not given back, so the serving process never holds both (measured: 1214 against 736 MiB RSS for
        SmolLM2-135M fp32 after a calibrating load in process)."""
        import multiprocessing

        folder = self.engine.folder
        spawn = multiprocessing.get_context("spawn")
        queue = spawn.Queue()
        child = spawn.Process(target=_calibrate_child, args=(str(folder.path), list(self.engine.policy.devices), queue),
                              name="inferos-calibrate")
        child.start()
        try:
            error = _answer(queue, child, CALIBRATION_TIMEOUT_S)
        finally:
            if child.is_alive():
                child.kill()
            child.join(timeout=30)
        if error is not None:
            raise ValueError(f"calibration failed: {error}")
        found = kv_scales.load_calibration(fingerprint, folder.num_kv_heads, folder.head_size)
        if found is None:
            raise ValueError("the calibration process wrote no scales")
        return replace(found, scales=replace(found.scales, source="calibrated"))

    def _passages(self, count: int) -> list[list[int]]:
        tokenizer = self.engine.tokenizer
        passages = []
        for text in calibration_passages(4 * count):
            ids = tokenizer.encode(text)[:kv_scales.CALIBRATION_TOKENS]
            if len(ids) >= 128:
                passages.append(ids)
            if len(passages) == count:
                break
        if len(passages) < 2:
            raise ValueError("the calibration corpus gave too few passages")
        return passages

    def _full_length(self, layout: KVLayout) -> KVLayout:
        """``layout`` with the model's whole context: calibration passages are not bound by ``--ctx-size``."""
        return replace(layout, max_tokens=self.engine.folder.context_length)

    def _float_kv(self, ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        cache = DenseKVCache(self._full_length(self.model_layout), len(ids))
        self.engine.forward(ids, cache)
        return [cache.layer(layer) for layer in range(self.model_layout.num_layers)]

    def _live_delta_nll(self, ids: list[int], chunk: int = 64) -> float:
        """Mean NLL of ``ids`` with the INT8 live form minus with the float form, in chunks (history is read)."""
        from lemonade_inferos.eval.scoring import log_softmax

        nll = {}
        for layout in (self.model_layout, self.int8_layout):
            cache, total = DenseKVCache(self._full_length(layout), len(ids)), []
            for start in range(0, len(ids) - 1, chunk):
                piece = ids[start:start + chunk]
                targets = np.asarray(ids[start + 1:start + 1 + len(piece)])
                logprobs = log_softmax(self.engine.forward(piece, cache))[: len(targets)]
                total.extend((-logprobs[np.arange(len(targets)), targets]).tolist())
            nll[layout.live_int8] = float(np.mean(total))
        return nll[True] - nll[False]

