"""Our engine: a plain ``onnxruntime.InferenceSession`` with IOBinding and our own loop.

Why not og.Generator: the loop must own its KV cache (tiered, quantizing,
evicting; see kvcache/), feed true positions, and reuse prefixes across
requests. The loop stays small:

    prefill:  for each chunk of the prompt not already cached -> reserve, run, commit
    decode:   sample -> stream -> reserve 1, run, commit -> ...

The cache's buffers are bound as both past and present, so ONNX Runtime
writes new K/V in place and nothing is copied per step.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from lemonade_inferos.engine.binding import StepBinding
from lemonade_inferos.engine.decode_batch import DecodeBatch
from lemonade_inferos.engine.emit import TokenEmitter
from lemonade_inferos.engine.guidance import Guidance, TokenConstraint, guidance_tokenizer
from lemonade_inferos.engine.graph import default_probe_layers, prepare_graph
from lemonade_inferos.engine.kv import CacheFullError, DenseKVCache, KVCache, KVLayout, SegmentSplice
from lemonade_inferos.engine.live_forms import LiveForms, LoadedForm
from lemonade_inferos.engine.model_folder import ModelFolder, load_model_folder
from lemonade_inferos.engine.picker import TokenPicker
from lemonade_inferos.engine.prompt_cache import cache_prefix_reuse, take_splices
from lemonade_inferos.engine.sampling import Sampler, SamplingParams
from lemonade_inferos.engine.session import (AppliedSessionOptions, SessionPolicy, build_session_options,
                                             make_run_options)
from lemonade_inferos.engine.speculative import AcceptanceWatch, Drafter, SpeculationConfig, ngram_drafter
from lemonade_inferos.engine.step_turns import StepTurns
from lemonade_inferos.engine.tokenizer import ChatTokenizer
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import GenerationError, InferosError

log = logging.getLogger(__name__)

PROBE_SCRATCH_BYTES = 4 << 20   # one probe layer's attention probabilities of a prompt chunk's probed rows, at most
SPLIT_PROBE_BYTES = 32 << 20    # the same where the probed rows need a run of their own (which costs a pass)
MIN_PROBE_ROWS = 16             # a chunk's rows probed however long the context

CacheFactory = Callable[[KVLayout], KVCache]


class OrtEngine:
    """Loads an onnxruntime-genai model folder and runs our own prefill/decode loop.

    Args:
        model: a model folder (path) or an already parsed :class:`ModelFolder`.
        policy: session options; defaults to ONNX Runtime's defaults on the best provider.
        prefill_chunk_tokens: longest prompt slice run at once (bounds logits memory).
        context_length: tokens a cache may hold (``--ctx-size``); at most the model's.
        attention_probe_layers: layers whose attention probabilities are returned to caches that rank blocks
            by attention (see ``graph.py``); empty for the plain graph.
        background_calibration: a folder whose INT8 live KV scales are not calibrated yet serves in its own KV
            form while they are calibrated in the background (a server: no first-request stall); else the
            first use of the INT8 form waits for them.
    """

    name = "inferos"

    def __init__(self, model: str | Path | ModelFolder, policy: SessionPolicy | None = None,
                 prefill_chunk_tokens: int = 512, context_length: int | None = None,
                 attention_probe_layers: tuple[int, ...] = (), background_calibration: bool = False,
                 turns: StepTurns | None = None) -> None:
        self.folder = model if isinstance(model, ModelFolder) else load_model_folder(model)
        self.turns = turns or StepTurns()   # the model's running sequences take their steps in turn
        self.folder.fingerprint  # read now (~18 MiB of the model): never inside a request's watched run
        self.policy = policy or SessionPolicy()
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.context_length = context_length
        self.tokenizer = ChatTokenizer.from_folder(self.folder.path)
        self._options, self.applied_options = build_session_options(self.policy.for_phase("prefill"))
        self._decode_options = build_session_options(self.policy.for_phase("decode")) if self.policy.hybrid else None
        if self.policy.attention_probe and not attention_probe_layers:
            attention_probe_layers = default_probe_layers(self.folder.num_layers, self.folder.local_layers)
            # probabilities are [heads, chunk, context] per probe layer: smaller chunks bound that memory
            self.prefill_chunk_tokens = min(self.prefill_chunk_tokens, 256)
        self._probe_layers = tuple(attention_probe_layers)
        graph = prepare_graph(self.folder.onnx_path, self._probe_layers)
        self.has_position_ids = graph.has_position_ids
        self.has_logits_positions = graph.has_logits_positions
        self.probe_outputs = graph.probe_outputs
        self._forms = LiveForms(self, graph, background=background_calibration)
        self._draft_engines: dict[str, OrtEngine] = {}
        self._decode_batches: dict[int, DecodeBatch] = {}   # per graph, the rows its sequences decode in
        self._guidance_tokenizer: object | None = None   # llguidance's tokenizer, built on the first constraint
        log.info("loaded %s on %s (true positions: %s; live KV: %s)", self.folder.path,
                 self.session.get_providers(), self.has_position_ids, self._forms.describe()["live_kv"])

    @property
    def layout(self) -> KVLayout:
        """The layout caches get by default (``policy.kv_cache``): the INT8 live form's once it is ready."""
        return self._forms.default_layout(self.policy.kv_cache)

    def session_options(self, phase: str) -> tuple[ort.SessionOptions, AppliedSessionOptions]:
        """The session options of ``phase``: decode's own under the hybrid scheduler, else prefill's."""
        if phase == "decode" and self._decode_options is not None:
            return self._decode_options
        return self._options, self.applied_options

    def transient_forms(self) -> ContextManager[None]:
        """Live forms first loaded inside are dropped after (see :meth:`LiveForms.transient`)."""
        return self._forms.transient()

    @property
    def hybrid(self) -> bool:
        return self._decode_options is not None

    @property
    def session(self) -> ort.InferenceSession:
        """The session of the default live form (``layout``)."""
        return self._forms.session_for(self.layout)

    def form_for(self, layout: KVLayout, phase: str = "prefill") -> "LoadedForm":
        """The loaded graph that reads caches of ``layout`` in ``phase`` (loaded on first use)."""
        return self._forms.form(layout, phase)

    def decode_batch(self, form: LoadedForm) -> DecodeBatch:
        """The batch the decode steps on ``form`` run in together (``decode_batch.py``; one per graph: sequences
        batch only with those reading the same one); a released one is replaced."""
        batch = self._decode_batches.get(id(form))
        if batch is None or batch.form is not form:
            batch = self._decode_batches[id(form)] = DecodeBatch(self, form)
        return batch

    def layout_for(self, plan: object) -> KVLayout:
        """The layout a cache under ``plan`` gets: INT8 live when the plan asks for it (``plan.live_kv``) and the
        model has that form, else the model's own KV dtype."""
        return self._forms.layout_for(getattr(plan, "live_kv", "model"))

    @property
    def full_precision_layout(self) -> KVLayout:
        """The model's own KV form (the reference every plan is scored against)."""
        return self._forms.model_layout

    def live_form_delta_nll(self, layout: KVLayout) -> float:
        """What the live form of ``layout`` costs against the float graph (nats per token, measured when its
        scales were calibrated; 0 for the model's own form or where it was not measured)."""
        calibration = self._forms.calibration
        if not layout.live_int8 or calibration is None or calibration.delta_nll is None:
            return 0.0
        return max(0.0, float(calibration.delta_nll))

    def live_kv_report(self) -> dict[str, object]:
        """Which forms this model runs in, where the INT8 scales came from, and why a form is missing."""
        return self._forms.describe()

    @staticmethod
    def observe(cache: KVCache, probes: list[np.ndarray] | None, num_new: int) -> None:
        if probes is not None:
            cache.observe_attention(probes, num_new)

    @property
    def report(self) -> AppliedSessionOptions:
        return self.applied_options

    def session_report(self) -> dict[str, object]:
        """What the sessions run with: prefill's options, decode's where they differ, the step path."""
        decode = self._decode_options[1].to_dict() if self._decode_options is not None else None
        return {"prefill": self.applied_options.to_dict(), "decode": decode, "hybrid": self.hybrid,
                "io_binding": self.policy.enable_iobinding}

    def new_cache(self, layout: KVLayout | None = None) -> KVCache:
        return DenseKVCache(layout or self.layout)

    # -- scoring -----------------------------------------------------------------------------
    def forward(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run ``token_ids`` after what ``cache`` holds and return every position's logits ``[n, vocab]``."""
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        return StepBinding(self, cache).run(ids, all_logits=True)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, stats: GenerationStats | None = None,
                 cache: KVCache | None = None, run_options: "dict[str, str] | ort.RunOptions | None" = None,
                 speculation: SpeculationConfig | None = None) -> Iterator[GenerationChunk]:
        """Stream a completion of ``prompt_ids``.

        Args:
            prompt_ids: the full prompt; a ``cache`` already holding a prefix of it is reused.
            params: sampling and stopping.
            stats: filled with measured timings as generation proceeds.
            cache: the KV cache to read and extend; a new dense cache when omitted.
            run_options: ONNX Runtime run config entries (e.g. ``memory.enable_memory_arena_shrinkage``), or a
                RunOptions the caller keeps (to terminate the run in flight).
            speculation: draft and verify (``speculative.py``); plain decoding when None or ``mode="off"``.

        Raises:
            GenerationError: empty prompt, or a prompt longer than the cache can hold.
        """
        with self.turns.sequence() as sequence:
            yield from self._generate(prompt_ids, params, stats, cache, run_options, speculation, sequence)

    def _generate(self, prompt_ids: Sequence[int], params: SamplingParams, stats: GenerationStats | None,
                  cache: KVCache | None, run_options: "dict[str, str] | ort.RunOptions | None",
                  speculation: SpeculationConfig | None, sequence: object) -> Iterator[GenerationChunk]:
        stats = stats if stats is not None else GenerationStats()
        cache = cache if cache is not None else self.new_cache()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError("the prompt is empty", param="prompt")
        reused = cache_prefix_reuse(cache, prompt)
        cache.plan_capacity(len(prompt) + params.max_tokens)
        stats.prompt_n, stats.cache_n = len(prompt), reused
        binding = StepBinding(self, cache, make_run_options(run_options), sequence)
        try:
            splices = take_splices(cache, prompt, reused)
            logits = self.prefill(binding, prompt[reused:], splices, reused)
            stats.cache_n += sum(len(s) for s in splices)
        except CacheFullError as exc:
            cache.truncate(reused)
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens but the context holds {exc.limit}; shorten it",
                param="messages", prompt_tokens=len(prompt), context_length=exc.limit) from exc
        stats.prefill_end_time = time.perf_counter()
        yield from self._decode(binding, logits, prompt, params, stats, speculation)

    def probe_rows(self, cached: int, chunk: int, budget: int = PROBE_SCRATCH_BYTES) -> int:
        """How many of a ``chunk`` of prompt tokens after ``cached`` ones are probed (its last rows): all of them
        while one probe layer's probabilities ``[heads, rows, context]`` fp32 fit ``budget``, else as many as fit,
        at least ``MIN_PROBE_ROWS``. The attention itself runs without probabilities (ONNX Runtime's flash path):
        the rows come from ``row_probe.py`` in the same run (the INT8 live form's graph: ``PROBE_SCRATCH_BYTES``),
        or from a run of their own (``probe_switch.py``, other probe graphs), which costs a pass over the weights
        (a 2K-token history's next 256 tokens: 325 against 427 tok/s, fp32 float form), so only past
        ``SPLIT_PROBE_BYTES``. Measured on a 6.9K-token prompt (SmolLM2 int4, INT8 live KV, the server's RSS):
        whole 256-token chunks probed grew it by 2.4x the prompt's FP16 KV, chunks shrunk to keep their
        probabilities within 32 MiB by 1.5x, this by 0.83x, as fast."""
        fit = budget // (4 * self.folder.num_attention_heads * (cached + chunk))
        return min(chunk, max(MIN_PROBE_ROWS, fit))

    def prefill(self, binding: StepBinding, ids: list[int], splices: Sequence[SegmentSplice] = (), offset: int = 0
                ) -> np.ndarray:
        """Run ``ids`` in chunks; where a splice begins (``offset`` is the position of ``ids[0]`` in the prompt),
        its KV goes into the cache instead of running its tokens (``kvcache/segments.py``)."""
        logits = None
        pending = list(splices)
        start = 0
        while start < len(ids):
            if pending and pending[0].at == offset + start:
                splice = pending.pop(0)
                splice.place(binding.cache)
                start += len(splice)
                continue
            chunk = self.turns.chunk_tokens(self.prefill_chunk_tokens)   # shorter while other sequences run
            end = min(len(ids), start + chunk, pending[0].at - offset if pending else len(ids))
            budget = PROBE_SCRATCH_BYTES if binding.row_probe else SPLIT_PROBE_BYTES
            probed = self.probe_rows(binding.cache.num_tokens, end - start, budget) if binding.probing else end - start
            if probed < end - start and not binding.row_probe:  # the probed rows run on their own
                binding.run(np.asarray(ids[start:end - probed], dtype=np.int64)[None, :], all_logits=False,
                            probe=False)
                start = end - probed
            logits = binding.run(np.asarray(ids[start:end], dtype=np.int64)[None, :], all_logits=False,
                                 probe_rows=probed)
            start = end
        assert logits is not None, "prefill of zero tokens: this indicates a bug in cache_prefix_reuse"
        return logits

    def _decode(self, binding: StepBinding, logits: np.ndarray, prompt: list[int], params: SamplingParams,
                stats: GenerationStats, speculation: SpeculationConfig | None = None) -> Iterator[GenerationChunk]:
        """Sample, stream, run the token, repeat. With a drafter, a step runs the last token and a draft at once
        and emits every token the model agrees with (``speculative.py``); the tokens committed and observed are
        exactly those plain decoding would have run, in the same order."""
        sampler = Sampler(params, self.folder.vocab_size)
        if params.penalizes:
            sampler.observe(prompt)
        emitter = TokenEmitter(self.tokenizer, self.folder.eos_token_ids, params)
        pick = TokenPicker(sampler, self.constraint(params.guidance))
        drafter = self._drafter(speculation) if speculation is not None and speculation.drafts else None
        watch = AcceptanceWatch(speculation.stop_below, speculation.num_draft_tokens) \
            if drafter is not None else None
        if drafter is not None:
            drafter.extend(prompt)
        step_ids = np.zeros((1, 1), dtype=np.int64)  # reused every step: no per-token allocations
        out = _Output(emitter, stats, params.max_tokens)
        token = pick.sample(logits)
        while True:
            if (chunk := out.push(token)) is not None:
                yield chunk
            if pick.finished:  # the output's grammar is complete: nothing more may follow
                emitter.complete()
            if out.over:
                break
            if drafter is not None:  # the drafter continues the sequence as emitted
                drafter.extend([token])
            room = params.max_tokens - out.produced - 1  # tokens a draft may add after this one
            draft = drafter.propose(min(watch.next_draft, room)) \
                if drafter is not None and not watch.stopped and room > 0 else []
            try:
                if not draft:
                    step_ids[0, 0] = token
                    logits = binding.run(step_ids, all_logits=False)
                    token = pick.sample(logits)
                    continue
                rows, probes = binding.verify([token, *draft])
            except CacheFullError:
                break  # context exhausted and the cache may not evict: finish with "length"
            outs = pick.accepted(rows, draft)
            watch.record(len(draft), len(outs) - 1)
            stats.drafted_n += len(draft)
            stats.accepted_n += len(outs) - 1
            kept = [token]
            for accepted in outs[:-1]:  # accepted draft tokens are emitted here; the last out goes round the loop
                if (chunk := out.push(accepted)) is not None:
                    yield chunk
                if out.over:
                    break
                kept.append(accepted)
                drafter.extend([accepted])
            binding.keep(kept, probes)
            if out.over:
                break
            token = outs[-1]
        stats.end_time = time.perf_counter()
        stats.finish_reason = emitter.finish_reason
        yield emitter.final()

    def _drafter(self, speculation: SpeculationConfig) -> Drafter | None:
        """The request's drafter; a draft model that cannot serve (missing, another tokenizer) is logged and the
        request decodes plainly (it is a setting's fault, not the request's nor the engine's)."""
        if speculation.mode != "draft":
            return ngram_drafter(speculation)
        from lemonade_inferos.engine.draft_model import ModelDrafter

        try:
            return ModelDrafter(self.draft_engine(speculation.draft_model))
        except (ValueError, InferosError) as exc:
            _log_once_per_reason(f"speculative decoding off for this model: {exc}")
            return None

    def draft_engine(self, name_or_path: str) -> "OrtEngine":
        """The draft model's engine (loaded once, one thread: it runs between the target's steps).

        Raises:
            ValueError: the draft model's tokenizer is not this model's (its ids would mean other tokens).
        """
        from lemonade_inferos.engine.build import resolve_model

        folder = resolve_model(name_or_path)
        key = str(folder.resolve())
        if key not in self._draft_engines:
            draft = OrtEngine(folder, SessionPolicy(devices=self.policy.devices, intra_op_num_threads=1),
                              context_length=self.layout.max_tokens)
            if draft.tokenizer.tokenizer.get_vocab() != self.tokenizer.tokenizer.get_vocab():
                raise ValueError(f"draft model {folder} has a different tokenizer than {self.folder.path}: "
                                 "its token ids would mean other tokens; pick a model of the same family")
            self._draft_engines[key] = draft
        return self._draft_engines[key]

    def constraint(self, guidance: Guidance | None) -> TokenConstraint | None:
        """A matcher for ``guidance`` over this model's tokenizer (None: unconstrained)."""
        if guidance is None:
            return None
        if self._guidance_tokenizer is None:
            self._guidance_tokenizer = guidance_tokenizer(self.tokenizer.tokenizer, self.folder.eos_token_ids)
        return TokenConstraint(guidance, self._guidance_tokenizer, self.folder.vocab_size)


class _Output:
    """The tokens a generation emits: counted, turned into chunks, and the word on when it is over."""

    def __init__(self, emitter: TokenEmitter, stats: GenerationStats, max_tokens: int) -> None:
        self.emitter, self.stats, self.max_tokens = emitter, stats, max_tokens
        self.produced = 0

    def push(self, token: int) -> GenerationChunk | None:
        self.stats.mark_token()
        self.produced += 1
        return self.emitter.push(token)

    @property
    def over(self) -> bool:
        return self.emitter.done or self.produced >= self.max_tokens


@functools.lru_cache(maxsize=32)
def _log_once_per_reason(message: str) -> None:
    log.warning(message)
