"""Batched decode: the next token of several sequences in one session run.

A decode step is a pass over all the weights for one token; at 1B-3B parameters that pass is bound by memory
bandwidth, so running four sequences' tokens in it costs little more than one. Measured on this repo's models
(one run for four sequences against four runs): SmolLM2 x2.2, a ~1B Llama x2.6, a ~3B x2.3.

GroupQueryAttention takes a batch whose rows have their own lengths: a right-padded attention mask gives each row
its length, ``position_ids`` its true positions, and the past is one buffer ``[rows, kv_heads, capacity,
head_size]`` per layer. Each running sequence keeps its own cache (tiered, evicting, quantizing, reused after
the request) and this batch keeps a *mirror* of it in one row: before a run, only what changed since the last run
is copied in (the cache reports the first token edited in place: ``KVCache.mirror_start``), and after it the
token's new K/V row is copied out. So a sequence decoding in batch after batch copies one token per step, and a
cache that is quantized or evicted between steps is recopied from the edit on.

Only the leader of a batch (``step_turns.py``) touches the mirror, inside its turn; the sequences themselves
sample, stream, commit and reorganize their caches in their own threads, as when they step alone. Logits and the
new K/V are bit-identical to single steps, attention probes equal within a float's rounding (their mean over
heads sums in another order; ``tests/engine/test_decode_batch.py``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnxruntime as ort

from lemonade_inferos.engine.dual_attention import INT8_ATTENTION
from lemonade_inferos.engine.graph import LOGITS_POSITIONS, POSITION_IDS
from lemonade_inferos.engine.kv import KVCache
from lemonade_inferos.engine.probe_switch import PROBE_SWITCH
from lemonade_inferos.engine.row_probe import PROBE_ROWS

if TYPE_CHECKING:
    from lemonade_inferos.engine.live_forms import LoadedForm
    from lemonade_inferos.engine.ort_engine import OrtEngine

GROW_TOKENS = 256   # the mirror's rows grow by this many tokens (a copy of every row per 256 tokens of the longest)


@dataclass(eq=False)
class DecodeStep:
    """One sequence's next token waiting at the model's turns, to run alone (``run_alone``: its own IOBinding
    over its own cache) or as a row of a batch; the batch writes its logits (``[1, 1, vocab]``) and probes
    (``[1, 1, 1, past + 1]`` views, None when not probing) where the sequence's own run would have."""

    batch: "DecodeBatch"
    sequence: object
    cache: KVCache
    token: int
    logits: np.ndarray
    probes: list[np.ndarray] | None
    run_options: ort.RunOptions | None
    run_alone: Callable[[], None]
    taken: bool = field(default=False)      # a leader runs it in its batch (set by StepTurns)
    finished: bool = field(default=False)   # that batch has run (set by StepTurns)
    failed: bool = field(default=False)     # ... and failed: the step runs alone after all


class DecodeBatch:
    """Rows mirroring the caches of the sequences that decode together on one graph (``form``)."""

    def __init__(self, engine: "OrtEngine", form: "LoadedForm") -> None:
        self.engine, self.form = engine, form
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._owners: list[weakref.ref | None] = []   # per row, the cache it mirrors
        self._views: dict[int, list[tuple[ort.OrtValue, ort.OrtValue]]] = {}   # per batch size: rows [0, n)
        self._logits: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (*self._keys, *self._values))

    def release(self) -> None:
        """Free the mirror and let go of the graph (the model has one sequence left: nothing to batch with; the
        next batch of this graph starts anew: ``OrtEngine.decode_batch``)."""
        self.form = None  # type: ignore[assignment]
        self._keys, self._values, self._owners = [], [], []
        self._views.clear()
        self._logits.clear()

    def run(self, steps: list[DecodeStep]) -> None:
        """Run every step's token in one session run and hand each its logits, probes and new K/V row."""
        try:
            self._run(steps)
        except BaseException:
            self._owners = [None] * len(self._owners)   # what the rows hold is unknown now: copied anew next time
            raise

    def _run(self, steps: list[DecodeStep]) -> None:
        steps = self._place(steps)   # row r is steps[r] from here on
        io = self.form.session.io_binding()
        logits = self._bind(io, steps)
        probing = any(step.probes is not None for step in steps)
        for name in self.engine.probe_outputs:
            io.bind_output(name, "cpu")
        self.form.session.run_with_iobinding(io, steps[0].run_options)
        probes = [value.numpy() for value in io.get_outputs()[-len(self.engine.probe_outputs):]] \
            if probing else []   # bound last
        for row, step in enumerate(steps):
            self._hand_out(row, step, logits, probes)

    # -- the mirror ----------------------------------------------------------------------------
    def _place(self, steps: list[DecodeStep]) -> list[DecodeStep]:
        """The steps in row order (rows ``0..n-1``): each cache keeps the row that mirrors it where that row is
        among them, the others take the rest and are copied in whole; every row is brought up to date."""
        count = len(steps)
        self._reserve(count, max(step.cache.num_tokens for step in steps) + 1)
        held = {}
        for row, owner in enumerate(self._owners):
            cache = owner() if owner is not None else None
            if cache is not None and row < count:
                held[id(cache)] = row
            else:
                self._owners[row] = None   # a row beyond this batch's is copied in whole when used again
        rows = [held.get(id(step.cache)) for step in steps]
        free = iter(row for row in range(count) if row not in rows)
        ordered: list[DecodeStep] = [None] * count  # type: ignore[list-item]
        for step, row in zip(steps, rows):
            fresh = row is None
            if fresh:
                row = next(free)
                self._owners[row] = weakref.ref(step.cache)
            self._copy_in(row, step.cache, 0 if fresh else step.cache.mirror_start())
            ordered[row] = step
        return ordered

    def _copy_in(self, row: int, cache: KVCache, start: int) -> None:
        end = cache.num_tokens
        if start < end:
            for layer, (key, value) in enumerate(cache.arrays()):
                self._keys[layer][row, :, start:end] = key[0, :, start:end]
                self._values[layer][row, :, start:end] = value[0, :, start:end]

    def _reserve(self, rows: int, tokens: int) -> None:
        """Room for ``rows`` rows of ``tokens`` tokens; growing keeps what the rows mirror."""
        layout = self.form.layout
        have_rows = len(self._owners)
        capacity = self._keys[0].shape[2] if self._keys else 0
        if rows <= have_rows and tokens <= capacity:
            return
        new_rows = max(rows, have_rows)
        if tokens > capacity:   # in steps of GROW_TOKENS, not doubling: the mirror is memory the caches hold too
            capacity = max(tokens, min(layout.max_tokens, max(-(-tokens // GROW_TOKENS) * GROW_TOKENS,
                                                               layout.min_tokens)))
        shape = (new_rows, layout.num_kv_heads, capacity, layout.head_size)

        def grown(old: np.ndarray | None) -> np.ndarray:
            array = np.zeros(shape, dtype=layout.dtype)
            if old is not None:
                array[:old.shape[0], :, :old.shape[2]] = old
            return array

        empty = [None] * layout.num_layers
        self._keys = [grown(old) for old in self._keys or empty]
        self._values = [grown(old) for old in self._values or empty]
        self._owners.extend([None] * (new_rows - have_rows))
        self._views.clear()

    # -- the run ------------------------------------------------------------------------------
    def _bind(self, io: ort.IOBinding, steps: list[DecodeStep]) -> np.ndarray:
        """Bind the steps' inputs, the mirror's first rows as past and present, and the logits; return those."""
        engine, folder, graph = self.engine, self.engine.folder, self.form.graph
        count = len(steps)
        lengths = [step.cache.num_tokens for step in steps]
        mask = np.zeros((count, max(lengths) + 1), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, :length + 1] = 1
        inputs: dict[str, np.ndarray] = {
            folder.input_names["input_ids"]: np.array([[step.token] for step in steps], dtype=np.int64),
            folder.input_names["attention_mask"]: mask}
        if engine.has_position_ids:
            inputs[POSITION_IDS] = np.concatenate([step.cache.new_positions(1) for step in steps])
        if engine.has_logits_positions:
            inputs[LOGITS_POSITIONS] = np.zeros(1, dtype=np.int64)
        if graph.dual_attention:
            inputs[INT8_ATTENTION] = np.array(True)
        if graph.probe_switch:
            inputs[PROBE_SWITCH] = np.array(any(step.probes is not None for step in steps))
        if graph.row_probe:
            inputs[PROBE_ROWS] = np.ones(1, dtype=np.int64)
        for name, value in inputs.items():
            io.bind_cpu_input(name, value)
        for layer, (key, value) in enumerate(self._rows_view(count)):
            io.bind_ortvalue_input(folder.past_key_name(layer), key)
            io.bind_ortvalue_input(folder.past_value_name(layer), value)
            io.bind_ortvalue_output(folder.present_key_name(layer), key)
            io.bind_ortvalue_output(folder.present_value_name(layer), value)
        for name, scale in self.form.scale_values:
            io.bind_ortvalue_input(name, scale)
        logits = self._logits.get(count)
        if logits is None:
            logits = self._logits[count] = np.empty((count, 1, folder.vocab_size), dtype=np.float32)
        io.bind_output(folder.output_names["logits"], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return logits

    def _rows_view(self, count: int) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        """Per layer, OrtValues over the mirror's rows ``[0, count)`` (contiguous: rows are the outer axis)."""
        if count not in self._views:
            self._views[count] = [(ort.OrtValue.ortvalue_from_numpy(key[:count]),
                                   ort.OrtValue.ortvalue_from_numpy(value[:count]))
                                  for key, value in zip(self._keys, self._values)]
        return self._views[count]

    def _hand_out(self, row: int, step: DecodeStep, logits: np.ndarray, probes: list[np.ndarray]) -> None:
        """Write row ``row``'s results where the step's own run would have, and its new K/V into its cache."""
        cache, position = step.cache, step.cache.num_tokens
        step.logits[0, 0] = logits[row, 0]
        if step.probes is not None:
            for view, probe in zip(step.probes, probes):
                view[...] = probe[row:row + 1, :, :, :position + 1]
        for layer, (key, value) in enumerate(cache.arrays()):
            key[0, :, position] = self._keys[layer][row, :, position]
            value[0, :, position] = self._values[layer][row, :, position]
        cache.mirror_synced(position + 1)

