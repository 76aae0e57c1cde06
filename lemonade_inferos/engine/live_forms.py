"""The live KV forms of one model: the graph in its own KV dtype, and the INT8 live form.

A cache's layout says which form reads it (``KVLayout.scales`` set: INT8 codes with static per-channel scales;
else the model's dtype), so one engine serves both at once: requests whose plan keeps KV in INT8 while it runs,
and the quality guard's full-precision step, scoring references and ``kv.mode: disabled`` on the float graph.
Each form is an ONNX Runtime session loaded on first use. The calibration that makes the INT8 form (see
``kv_scales.py``) needs the float graph, so it runs in a child process of its own (:func:`calibrate_folder`): the
serving process never holds both graphs for it (memory a process has held is not given back). It runs when a
model is built or pulled (``prepare.py``, with progress), so a server finds the scales kept; a folder a
server meets first is calibrated in the background while the model's own form serves (``background``), and new
caches get the INT8 form once its scales are ready.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from lemonade_inferos.corpus import calibration_passages
from lemonade_inferos.engine import heap, kv_scales
from lemonade_inferos.engine.graph import PreparedGraph, prepare_graph
from lemonade_inferos.engine.kv import DenseKVCache, KVLayout
from lemonade_inferos.engine.session import SessionPolicy

if TYPE_CHECKING:
    from lemonade_inferos.engine.model_folder import ModelFolder
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


CALIBRATION_TIMEOUT_S = 900
Progress = Callable[[int, int], None]   # (passages done, passages)
# set in the calibration process only: it calibrates in process and reports each passage here
_child_progress: Progress | None = None


def _calibrate_child(engine_class: type[OrtEngine], folder: str, devices: list[str], queue: Any) -> None:
    """The calibration process: load the model with the INT8 live form, which calibrates and keeps the scales."""
    global _child_progress
    _child_progress = lambda done, total: queue.put(("progress", done, total))
    try:
        engine = engine_class(folder, SessionPolicy(devices=devices, kv_cache="int8"))
        queue.put(("done", engine.live_kv_report()["int8_unavailable_reason"]))
    except Exception as exc:  # reported to the serving process, which keeps its float form
        queue.put(("done", f"{type(exc).__name__}: {exc}"))


def _answer(queue: Any, child: Any, timeout_s: float, progress: Progress) -> str | None:
    """The calibration process's answer (None: success, else its error), relaying its progress; a process that
    exits without one or outlives ``timeout_s`` is an error, found within a second."""
    import queue as queues

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            message = queue.get(timeout=1.0)
        except queues.Empty:
            if not child.is_alive():
                raise ValueError(f"the calibration process exited with code {child.exitcode} and no answer")
            continue
        if message[0] == "done":
            return message[1]
        progress(*message[1:])
    raise ValueError(f"the calibration process gave no answer in {timeout_s:.0f} s")


def calibrate_folder(folder: ModelFolder, devices: list[str], engine_class: type[OrtEngine],
                     progress: Progress = lambda done, total: None) -> kv_scales.Calibration:
    """Calibrate ``folder``'s INT8 live KV scales in a fresh process and return them (kept in INFEROS_HOME).
    The process loads an ``engine_class`` (passed by name: this module sits below the engine it serves).

    A fresh process because it loads the float graph and then the INT8 one (the float form is dropped first: one
    copy of the weights at a time), and memory a process has held is not all given back: a server never holds
    both (measured: 1214 against 736 MiB RSS for SmolLM2-135M fp32 after a calibrating load in process)."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_calibrate_child, args=(engine_class, str(folder.path), list(devices), queue),
                          name="inferos-calibrate")
    child.start()
    try:
        error = _answer(queue, child, CALIBRATION_TIMEOUT_S, progress)
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=30)
    if error is not None:
        raise ValueError(f"calibration failed: {error}")
    found = kv_scales.load_calibration(folder.fingerprint, folder.num_kv_heads, folder.head_size)
    if found is None:
        raise ValueError("the calibration process wrote no scales")
    return replace(found, scales=replace(found.scales, source="calibrated"))


def known_scales(folder: "ModelFolder") -> kv_scales.Calibration | None:
    """Scales that need no calibration run: the folder's own file, or a calibration kept for its fingerprint."""
    scales = kv_scales.folder_scales(folder.path, folder.num_kv_heads, folder.head_size)
    if scales is not None:
        return kv_scales.Calibration(scales, None, None)
    return kv_scales.load_calibration(folder.fingerprint, folder.num_kv_heads, folder.head_size)


class LiveForms:
    def __init__(self, engine: "OrtEngine", graph: PreparedGraph, background: bool = False) -> None:
        """``background``: a folder without scales is calibrated in a background process while the model's own
        form serves (a server); else the first use of the INT8 form waits for its calibration."""
        self.engine = engine
        self.background = background
        self.calibrating: dict[str, Any] | None = None   # while a background calibration runs: its progress
        self._graphs: dict[bool, PreparedGraph] = {False: graph}
        self._loaded: dict[tuple[bool, str], LoadedForm] = {}   # (INT8?, phase) -> its session
        self._lock = threading.RLock()
        self.calibration: kv_scales.Calibration | None = None
        self.int8_reason: str | None = None
        folder = engine.folder
        self.model_layout = KVLayout(num_layers=folder.num_layers, num_kv_heads=folder.num_kv_heads,
                                     head_size=folder.head_size, max_tokens=self._max_tokens(),
                                     min_tokens=folder.sliding_window,
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
                "calibrating": dict(self.calibrating) if self.calibrating else None,
                "scales": kv_scales.describe(self.calibration),
                "loaded_forms": sorted({"int8" if int8 else "model" for int8, _ in self._loaded}),
                "loaded_sessions": sorted(f"{'int8' if int8 else 'model'}:{phase}" for int8, phase in self._loaded)}

    @contextlib.contextmanager
    def transient(self) -> Iterator[None]:
        """Forms first loaded inside are dropped after, their memory returned (a quality pass's float reference:
        a second copy of the weights, not held between passes). A request that took one meanwhile keeps it."""
        with self._lock:
            before = set(self._loaded)
        try:
            yield
        finally:
            with self._lock:
                dropped = [key for key in self._loaded if key not in before]
                for key in dropped:
                    del self._loaded[key]
            if dropped:
                heap.trim()

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
        graph = prepare_graph(engine.folder.onnx_path, engine._probe_layers, int8_kv=True,
                              head_size=engine.folder.head_size)
        if graph.kv_int8_reason is not None:
            self.int8_reason = graph.kv_int8_reason
            return
        self._graphs[True] = graph
        had_model_form = any(not int8 for int8, _ in self._loaded)
        try:
            found = known_scales(engine.folder)  # read once: the folder's file or a kept calibration
            if found is None and self.background and _child_progress is None:
                self._calibrate_in_background()
                return
            calibration = found or self._calibration()
        except Exception as exc:  # no scales means no INT8 form, never a failed request: the float form serves
            self._no_scales(exc)
            return
        finally:
            if not had_model_form:  # the float form was only needed to calibrate
                self._drop_forms(int8=False)
        self._adopt(calibration)

    def _drop_forms(self, int8: bool) -> None:
        """Unload the sessions of one form (INT8 or the model's own)."""
        with self._lock:
            for key in [k for k in self._loaded if k[0] == int8]:
                del self._loaded[key]

    def _adopt(self, calibration: kv_scales.Calibration) -> None:
        self.calibration = calibration
        self.int8_layout = replace(self.model_layout, dtype=np.dtype(np.int8), scales=calibration.scales)
        self.int8_reason = None
        log.info("%s: INT8 live KV with scales from %s (%s)", self.engine.folder.path, calibration.scales.source,
                 kv_scales.describe(calibration))

    def _no_scales(self, exc: Exception) -> None:
        self.int8_reason = f"no INT8 scales: {type(exc).__name__}: {exc}"
        log.warning("%s: INT8 live KV off (%s)", self.engine.folder.path, self.int8_reason,
                    exc_info=not isinstance(exc, (ValueError, OSError)))
        self.int8_layout = None
        self._drop_forms(int8=True)

    def _calibrate_in_background(self) -> None:
        """Calibrate in a child process while the model's own form serves; new caches get the INT8 form after."""
        folder = self.engine.folder
        self.int8_reason = "its INT8 scales are being calibrated in the background"
        self.calibrating = {"started_at": time.time(), "passages_done": 0,
                            "passages": kv_scales.CALIBRATION_PASSAGES}
        log.info("%s: no INT8 live KV scales yet: calibrating them in the background (%d passages); the model's "
                 "own KV form serves until they are ready", folder.path, kv_scales.CALIBRATION_PASSAGES)
        threading.Thread(target=self._background_calibration, name="inferos-calibrate", daemon=True).start()

    def _background_calibration(self) -> None:
        folder, started = self.engine.folder, time.perf_counter()
        try:
            calibration = calibrate_folder(folder, list(self.engine.policy.devices), type(self.engine),
                                           self._background_progress)
        except Exception as exc:
            with self._lock:
                self.calibrating = None
                self._no_scales(exc)
            return
        with self._lock:
            self.calibrating = None
            self._adopt(calibration)
        log.info("%s: INT8 live KV scales ready after %.1f s: new requests use the INT8 live form", folder.path,
                 time.perf_counter() - started)

    def _background_progress(self, done: int, total: int) -> None:
        if self.calibrating is not None:
            self.calibrating.update(passages_done=done, passages=total)
        log.info("%s: calibrating INT8 live KV scales: passage %d/%d", self.engine.folder.path, done, total)

    def _calibration(self) -> kv_scales.Calibration:
        """A calibration run: in a child process, or here when this is that process."""
        folder = self.engine.folder
        if _child_progress is None:
            return calibrate_folder(folder, list(self.engine.policy.devices), type(self.engine))
        started = time.perf_counter()
        heads, head_size = folder.num_kv_heads, folder.head_size
        passages = self._passages(kv_scales.CALIBRATION_PASSAGES + 1)
        scales, saturated = kv_scales.calibrate(self._float_kv, passages[:-1], heads, head_size, _child_progress)
        float_nll = self._mean_nll(self.model_layout, passages[-1])
        self._drop_forms(int8=False)   # one copy of the weights at a time: the float form is not needed again
        heap.trim()
        self.int8_layout = replace(self.model_layout, dtype=np.dtype(np.int8), scales=scales)
        delta_nll = self._mean_nll(self.int8_layout, passages[-1]) - float_nll
        calibration = kv_scales.Calibration(scales, delta_nll, saturated)
        path = kv_scales.save_calibration(folder.fingerprint, calibration)
        log.info("calibrated INT8 live KV scales for %s in %.1f s (kept in %s)", folder.path,
                 time.perf_counter() - started, path)
        return calibration

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

    def _mean_nll(self, layout: KVLayout, ids: list[int], chunk: int = 64) -> float:
        """Mean NLL of ``ids`` with a cache of ``layout``, in chunks (history is read): the INT8 live form's minus
        the float form's is what the INT8 form costs."""
        from lemonade_inferos.engine.sampling import log_softmax

        cache, total = DenseKVCache(self._full_length(layout), len(ids)), []
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start:start + chunk]
            targets = np.asarray(ids[start + 1:start + 1 + len(piece)])
            logprobs = log_softmax(self.engine.forward(piece, cache))[: len(targets)]
            total.extend((-logprobs[np.arange(len(targets)), targets]).tolist())
        return float(np.mean(total))

