"""One request's steps on our engine's sessions: with IOBinding, the cache's buffers bound as past and present, the
inputs of each step, and the outputs written into preallocated memory.

``run`` runs tokens and commits them; ``verify`` runs the last token and a draft without committing, and ``keep``
commits the accepted prefix (speculative decoding).

Under the hybrid scheduler a step of more than one token (a prompt chunk) runs on the prefill session and a step
of one token, or a draft's verification, on the decode session; both bind the same KV buffers, so nothing is
handed over between them on one device. A graph of two attention paths (``dual_attention.py``: the INT8 live
form) runs a prompt chunk on its float path, whose present outputs are the chunk's K/V codes, written into the
cache after the run, and everything else on its INT8 path, in place. With ``enable_iobinding`` off a step is a
plain ``session.run``: ONNX Runtime allocates every output, and the new K/V are copied into the cache afterwards
(the ablation's "no IOBinding" row: what in-place KV saves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from lemonade_inferos.engine.decode_batch import DecodeStep
from lemonade_inferos.engine.dual_attention import INT8_ATTENTION
from lemonade_inferos.engine.graph import LOGITS_POSITIONS, POSITION_IDS
from lemonade_inferos.engine.probe_switch import PROBE_SWITCH
from lemonade_inferos.engine.row_probe import PROBE_ROWS
from lemonade_inferos.engine.kv import KVCache

if TYPE_CHECKING:
    from lemonade_inferos.engine.ort_engine import OrtEngine


class _PhaseIO:
    """One phase's session and its IOBinding (rebinds K/V only when the cache reallocates its buffers).

    ``float_attention``: the phase runs the dual-attention graph's float path (present outputs: the chunk's codes).
    """

    def __init__(self, form: Any, io_binding: bool, float_attention: bool = False) -> None:
        self.form = form
        self.io = form.session.io_binding() if io_binding else None
        self.bound_version = -1
        self.float_attention = float_attention
        self.switch = np.array(not float_attention)  # INT8_ATTENTION (bound by address: kept alive here)
        self.probe = np.array(True)                   # PROBE_SWITCH, set before each run
        self.rows = np.ones(1, dtype=np.int64)        # PROBE_ROWS, set before each run


class StepBinding:
    """One request's steps; each phase's IOBinding rebinds K/V only when the cache reallocates its buffers."""

    def __init__(self, engine: "OrtEngine", cache: KVCache, run_options: ort.RunOptions | None = None,
                 sequence: object = None) -> None:
        self.engine = engine
        self.run_options = run_options
        self.cache = cache
        self.sequence = sequence   # the model's handle of the generation these steps are (None: scoring)
        io_binding = engine.policy.enable_iobinding
        # the graph that reads this cache's live form, per phase (one object unless the scheduler is hybrid)
        prefill_form = engine.form_for(cache.layout, "prefill")
        dual = prefill_form.graph.dual_attention
        prefill = _PhaseIO(prefill_form, io_binding, float_attention=dual)
        decode = (_PhaseIO(engine.form_for(cache.layout, "decode"), io_binding) if engine.hybrid or dual
                  else prefill)
        self._phases = {"prefill": prefill, "decode": decode}
        self.form = prefill.form
        self._mask = np.ones((1, cache.layout.max_tokens + 1), dtype=np.int64)
        # decode (and prefill, where the graph selects logits rows) writes one row of logits into the same buffer
        self._step_logits = np.empty((1, 1, engine.folder.vocab_size), dtype=np.float32)
        self._last_row = np.zeros(1, dtype=np.int64)
        # decode steps write the probes' attention rows ([1, 1, past + 1] each: the mean over heads) into buffers
        # of their own, allocated at the first decode step (scoring runs chunks only)
        self._step_probes: list[np.ndarray] = []

    @property
    def probing(self) -> bool:
        """Whether runs return the probe layers' attention (the graph has probes and the cache ranks by them)."""
        return bool(self.engine.probe_outputs) and self.cache.wants_attention

    @property
    def row_probe(self) -> bool:
        """Whether a prompt chunk can be probed on its last rows in the same run (``row_probe.py``)."""
        return self._phases["prefill"].form.graph.row_probe

    def run(self, token_ids: np.ndarray, all_logits: bool, probe: bool = True, probe_rows: int | None = None
            ) -> np.ndarray:
        """Run the model on ``token_ids`` ``[1, n]`` after the cached tokens; commit them. ``probe=False`` runs
        the probe layers without their probabilities (where the graph can: ``probe_switch.py``); ``probe_rows``:
        a prompt chunk's probabilities for its last rows only (where the graph can: ``row_probe.py``).

        Returns:
            logits ``[n, vocab]`` when ``all_logits`` else ``[vocab]`` for the last token.
        """
        logits, probes = self._forward(token_ids, all_logits, probe, probe_rows)
        self.engine.observe(self.cache, probes, token_ids.shape[1])
        self.cache.commit(token_ids[0].tolist())
        return logits[0] if all_logits else logits[0, -1]

    def verify(self, token_ids: list[int]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Run ``token_ids`` (the last sampled token and a draft) and return every row's logits ``[n, vocab]`` and
        the probes, committing nothing: :meth:`keep` then commits the accepted prefix."""
        logits, probes = self._forward(np.asarray(token_ids, dtype=np.int64)[None, :], all_logits=True)
        return logits[0], probes

    def keep(self, token_ids: list[int], probes: list[np.ndarray] | None) -> None:
        """Commit the first ``len(token_ids)`` tokens of the last :meth:`verify` (their K/V is in place already);
        the attention they saw is observed as if they had run alone: their rows, up to their own keys."""
        num_keep = len(token_ids)
        if probes is not None:
            total = self.cache.num_tokens + num_keep
            probes = [p[:, :, :num_keep, :total] for p in probes]
        self.engine.observe(self.cache, probes, num_keep)
        self.cache.commit(token_ids)

    def _inputs(self, token_ids: np.ndarray, all_logits: bool) -> tuple[dict[str, np.ndarray], int]:
        """The step's inputs besides the KV (and the number of logits rows it returns)."""
        engine, cache = self.engine, self.cache
        num_new = token_ids.shape[1]
        names = engine.folder.input_names
        inputs = {names["input_ids"]: token_ids, names["attention_mask"]: self._mask[:, :cache.num_tokens + num_new]}
        if engine.has_position_ids:
            inputs[POSITION_IDS] = cache.new_positions(num_new)
        rows = num_new if all_logits or not engine.has_logits_positions else 1
        if engine.has_logits_positions:
            self._last_row[0] = num_new - 1
            inputs[LOGITS_POSITIONS] = np.arange(num_new, dtype=np.int64) if rows > 1 else self._last_row
        return inputs, rows

    def _forward(self, token_ids: np.ndarray, all_logits: bool, probe: bool = True, probe_rows: int | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        engine, cache = self.engine, self.cache
        num_new = token_ids.shape[1]
        cache.reserve(num_new)
        phase = self._phases["prefill" if num_new > 1 and not all_logits else "decode"]
        probe = self.probing and (probe or not phase.form.graph.probe_switch)
        phase.probe[()] = probe
        phase.rows[0] = min(num_new, probe_rows or num_new) if probe else 1
        inputs, rows = self._inputs(token_ids, all_logits)
        if phase.io is None:
            return self._run_plain(phase, inputs, num_new)
        io = phase.io
        if cache.buffers_version != phase.bound_version:
            self._bind_cache(phase)
        self._switches(phase, inputs)
        for name, value in inputs.items():
            io.bind_cpu_input(name, value)
        logits = (self._step_logits if rows == 1
                  else np.empty((1, rows, engine.folder.vocab_size), dtype=np.float32))
        io.bind_output(engine.folder.output_names["logits"], "cpu", 0, np.float32, list(logits.shape),
                       logits.ctypes.data)
        chunk = self._bind_chunk_codes(io, num_new) if phase.float_attention else None
        probes = self._bind_probes(io, num_new, cache.num_tokens + num_new, probe)  # last: see below
        run = lambda: phase.form.session.run_with_iobinding(io, self.run_options)  # noqa: E731
        if num_new == 1 and chunk is None and self.sequence is not None:   # a decode step: it may batch
            engine.turns.decode_turn(DecodeStep(engine.decode_batch(phase.form), self.sequence, cache,
                                                int(token_ids[0, 0]), logits, probes if probe else None,
                                                self.run_options, run))
        else:
            with engine.turns.turn(self.sequence):   # the model's other sequences run their steps between this one's
                run()
        if chunk is not None:
            start = cache.num_tokens
            for (key, value), (key_codes, value_codes) in zip(cache.arrays(), chunk):
                key[:, :, start:start + num_new] = key_codes
                value[:, :, start:start + num_new] = value_codes
        if not probe:
            return logits, None
        if probes is None:  # a chunk: ORT allocated them; they were bound last
            probes = [value.numpy() for value in io.get_outputs()[-len(engine.probe_outputs):]]
        return logits, probes

    def _run_plain(self, phase: _PhaseIO, inputs: dict[str, np.ndarray], num_new: int
                   ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """A step without IOBinding: ONNX Runtime allocates the outputs; the present K/V are copied back."""
        engine, cache, folder = self.engine, self.cache, self.engine.folder
        feeds: dict[str, ort.OrtValue] = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                                          for name, value in inputs.items()}
        for layer, (key, value) in enumerate(cache.ort_values()):
            feeds[folder.past_key_name(layer)], feeds[folder.past_value_name(layer)] = key, value
        feeds.update(phase.form.scale_values)
        if phase.form.graph.dual_attention:
            feeds[INT8_ATTENTION] = ort.OrtValue.ortvalue_from_numpy(phase.switch)
        switches: dict[str, np.ndarray] = {}
        self._switches(phase, switches)
        feeds.update({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in switches.items()})
        presents = [name for layer in range(folder.num_layers)
                    for name in (folder.present_key_name(layer), folder.present_value_name(layer))]
        names = [folder.output_names["logits"], *presents, *engine.probe_outputs]
        with engine.turns.turn():
            outputs = phase.form.session.run_with_ort_values(names, feeds, self.run_options)
        start = cache.num_tokens if phase.float_attention else 0  # the float path's present: the chunk's rows
        for (key, value), present_key, present_value in zip(cache.arrays(), outputs[1::2], outputs[2::2]):
            _copy_present(key, present_key.numpy(), start)
            _copy_present(value, present_value.numpy(), start)
        logits = outputs[0].numpy()
        probes = [o.numpy() for o in outputs[1 + len(presents):]] if engine.probe_outputs else []
        return logits, (probes if probes and bool(phase.probe) else None)

    @staticmethod
    def _switches(phase: _PhaseIO, inputs: dict[str, np.ndarray]) -> None:
        """The probe's per-run inputs, where the graph has them."""
        if phase.form.graph.probe_switch:
            inputs[PROBE_SWITCH] = phase.probe
        if phase.form.graph.row_probe:
            inputs[PROBE_ROWS] = phase.rows

    def _bind_probes(self, io: ort.IOBinding, num_new: int, total: int, probe: bool) -> list[np.ndarray] | None:
        """Bind the attention probe outputs: a decode step's into preallocated buffers (returned as the
        ``[1, 1, 1, total]`` views ORT writes: the mean over heads), a prefill chunk's, or a run's without probes
        (empty), to ORT-allocated memory (None)."""
        names = self.engine.probe_outputs
        if not names:
            return None
        if num_new > 1 or not probe:
            for name in names:
                io.bind_output(name, "cpu")
            return None
        if not self._step_probes:
            self._step_probes = [np.empty(self.cache.layout.max_tokens + 1, dtype=np.float32) for _ in names]
        shape = [1, 1, 1, total]
        views = [buffer[:total].reshape(shape) for buffer in self._step_probes]
        for name, view in zip(names, views):
            io.bind_output(name, "cpu", 0, np.float32, shape, view.ctypes.data)
        return views

    def _bind_chunk_codes(self, io: ort.IOBinding, num_new: int) -> np.ndarray:
        """Bind the float path's present outputs (the chunk's K/V codes) to one buffer; returned as
        ``[layer, key|value, 1, kv_heads, num_new, head_size]``."""
        folder, layout = self.engine.folder, self.cache.layout
        shape = [1, layout.num_kv_heads, num_new, layout.head_size]
        codes = np.empty((layout.num_layers, 2, *shape), dtype=layout.dtype)
        for layer in range(layout.num_layers):
            for kind, name in enumerate((folder.present_key_name(layer), folder.present_value_name(layer))):
                io.bind_output(name, "cpu", 0, layout.dtype, shape, codes[layer, kind].ctypes.data)
        return codes

    def _bind_cache(self, phase: _PhaseIO) -> None:
        folder, io = self.engine.folder, phase.io
        for layer, (key, value) in enumerate(self.cache.ort_values()):
            io.bind_ortvalue_input(folder.past_key_name(layer), key)
            io.bind_ortvalue_input(folder.past_value_name(layer), value)
            if not phase.float_attention:  # written in place; the float path's chunk codes are bound per step
                io.bind_ortvalue_output(folder.present_key_name(layer), key)
                io.bind_ortvalue_output(folder.present_value_name(layer), value)
        for name, scale in phase.form.scale_values:  # the INT8 live form's per-channel scales
            io.bind_ortvalue_input(name, scale)
        if phase.form.graph.dual_attention:
            io.bind_cpu_input(INT8_ATTENTION, phase.switch)
        phase.bound_version = self.cache.buffers_version


def _copy_present(buffer: np.ndarray, present: np.ndarray, start: int = 0) -> None:
    """Write a present K/V output into the cache's buffer from row ``start`` (it may be shorter than the buffer's
    capacity)."""
    length = min(buffer.shape[2] - start, present.shape[2])
    buffer[:, :, start:start + length] = present[:, :, :length]
