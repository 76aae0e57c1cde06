"""The baseline: onnxruntime-genai's ``og.Generator``, what Lemonade runs today.

Same interface and same tokenizer as :class:`OrtEngine`, so benchmarks and the
host can swap one for the other (A/B in one process).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

from lemonade_inferos.engine.emit import TokenEmitter
from lemonade_inferos.engine.model_folder import ModelFolder, load_model_folder
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.step_turns import StepTurns
from lemonade_inferos.engine.tokenizer import ChatTokenizer
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats
from lemonade_inferos.errors import GenerationError, MissingExtraError

log = logging.getLogger(__name__)


def _import_og():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise MissingExtraError("onnxruntime-genai is not installed: pip install 'lemonade-inferos[cpu]'") from exc
    return og


class OgEngine:
    """og.Generator behind the :class:`~lemonade_inferos.engine.types.Engine` interface."""

    name = "og"

    def __init__(self, model: str | Path | ModelFolder, context_length: int | None = None,
                 turns: StepTurns | None = None) -> None:
        og = _import_og()
        self.turns = turns or StepTurns()   # og.Generator's steps take turns with the model's other sequences
        self.folder = model if isinstance(model, ModelFolder) else load_model_folder(model)
        self.context_length = min(context_length or self.folder.context_length, self.folder.context_length)
        self.tokenizer = ChatTokenizer.from_folder(self.folder.path)
        self._og = og
        self.model = og.Model(str(self.folder.path))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 stats: GenerationStats | None = None, ngram: bool = False,
                 **_: object) -> Iterator[GenerationChunk]:
        """Stream a completion; ``ngram`` turns on og.Generator's own n-gram speculation (for benchmarks)."""
        og = self._og
        stats = stats if stats is not None else GenerationStats()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError("the prompt is empty", param="prompt")
        if len(prompt) >= self.context_length:
            raise GenerationError(f"the prompt has {len(prompt)} tokens but the context holds "
                                  f"{self.context_length}; shorten it", param="messages")
        og_params = og.GeneratorParams(self.model)
        og_params.set_search_options(**self._search_options(len(prompt), params))
        if params.guidance is not None:  # the same constraint, through og.Generator's own llguidance
            og_params.set_guidance(params.guidance.kind, params.guidance.data)
        if ngram:
            og_params.set_speculative_options(ngram_size=3, max_draft_tokens=4)
        generator = og.Generator(self.model, og_params)
        stats.prompt_n = len(prompt)
        with self.turns.turn():
            generator.append_tokens(prompt)
        stats.prefill_end_time = time.perf_counter()
        emitter = TokenEmitter(self.tokenizer, self.folder.eos_token_ids, params)
        length = len(prompt)
        while stats.predicted_n < params.max_tokens and not generator.is_done():
            with self.turns.turn():
                generator.generate_next_token()  # one token, or several with speculation
            sequence = generator.get_sequence(0)
            tokens = [int(t) for t in sequence[length:len(sequence)]]
            if generator.is_done():  # an EOS that ends the generation is not appended to the sequence
                last = int(generator.get_next_tokens()[0])
                if not tokens or tokens[-1] != last:
                    tokens.append(last)
            for token in tokens:
                stats.mark_token()
                chunk = emitter.push(token)
                if chunk is not None:
                    yield chunk
                if emitter.done or stats.predicted_n == params.max_tokens:
                    break
            length = len(sequence)
            if emitter.done:
                break
        stats.end_time = time.perf_counter()
        stats.finish_reason = emitter.finish_reason
        yield emitter.final()

    def _search_options(self, prompt_tokens: int, params: SamplingParams) -> dict[str, object]:
        """og.Generator's search options for ``params`` (a penalty it has no option for is logged, not applied)."""
        wanted = min(prompt_tokens + max(params.max_tokens, 1), self.context_length)
        # the loop stops at max_tokens; a sliding-window model's KV must still hold its window (GQA refuses less)
        max_length = min(max(wanted, self.folder.sliding_window), self.context_length)
        search: dict[str, object] = {"max_length": max_length, "do_sample": not params.greedy,
                                     "repetition_penalty": params.repetition_penalty}
        if params.frequency_penalty or params.presence_penalty or params.repeat_last_n is not None:
            log.warning("not applied by og.Generator (it has no such search options): frequency_penalty %s, "
                        "presence_penalty %s, repeat_last_n %s", params.frequency_penalty, params.presence_penalty,
                        params.repeat_last_n)
        if not params.greedy:
            search.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
            if params.seed is not None:
                search["random_seed"] = params.seed
        if params.ignore_eos:
            # og.Generator is done once it samples EOS, so it cannot run on past one as our engine does;
            # min_length keeps EOS from being sampled at all (llama.cpp's ignore_eos) to honour max_tokens.
            search["min_length"] = wanted
        return search
