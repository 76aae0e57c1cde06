"""Next-token selection from logits: greedy, temperature, top-k, top-p, repetition penalty.

Runs in numpy on one row of logits per step. A seeded ``numpy.random.Generator``
per request makes sampling reproducible: same seed, same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lemonade_inferos.engine.guidance import Guidance
from lemonade_inferos.errors import GenerationError


SEED_RANGE = 2**31


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` (or ``do_sample=False``) means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0       # OpenAI's: minus this times a token's count in the window
    presence_penalty: float = 0.0        # ... minus this once for a token in the window at all
    repeat_last_n: int | None = None     # llama.cpp's window of the penalties: the last n tokens (prompt
                                         # included); 0 turns them off, None or -1 is every token
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    guidance: Guidance | None = None     # a grammar the output must follow (engine/guidance.py)

    def __post_init__(self) -> None:
        if self.seed is not None:
            # a negative seed asks for a random one (llama.cpp's -1); others are folded into the range
            # og.Generator's random_seed takes (a C int), so both engines accept every integer seed
            object.__setattr__(self, "seed", None if self.seed < 0 else self.seed % SEED_RANGE)
        if self.max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {self.max_tokens}", param="max_tokens")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", param="top_k")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                  param="repetition_penalty")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if self.repeat_last_n is not None and self.repeat_last_n < -1:
            raise GenerationError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}", param="repeat_last_n")

    @property
    def penalizes(self) -> bool:
        """Whether any penalty acts on the tokens already seen."""
        return self.repeat_last_n != 0 and (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                                             or self.presence_penalty != 0.0)

    def settings(self) -> dict[str, object]:
        """The sampling as plain values (what a recorded request keeps: everything but max_tokens and the grammar)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty, "repeat_last_n": self.repeat_last_n, "seed": self.seed,
                "stop": list(self.stop), "ignore_eos": self.ignore_eos}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Stateful per request: owns the RNG and the tokens already seen (for the penalties)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._history: list[int] = []
        self._counts = np.zeros(vocab_size, dtype=np.int32)   # of each token in the penalties' window, kept as
                                                               # tokens come and go: O(1) a decode step

    def observe(self, token_ids: list[int] | np.ndarray) -> None:
        """Record prompt or generated tokens for the penalties (counted again at once: a prompt is thousands)."""
        self._history.extend(int(t) for t in token_ids)
        window = self.params.repeat_last_n
        recent = self._history[-window:] if window is not None and window > 0 else self._history
        size = len(self._counts)
        self._counts[:] = np.bincount(np.asarray(recent, dtype=np.int64), minlength=size)[:size]

    def _remember(self, token: int) -> None:
        self._history.append(token)
        self._counts[token] += 1
        window = self.params.repeat_last_n
        if window is not None and window > 0 and len(self._history) > window:
            self._counts[self._history[-window - 1]] -= 1   # the token that left the window

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from one row of logits (shape ``[vocab]``)."""
        logits = self._penalized(logits)
        if self.params.greedy:
            token = int(np.argmax(logits))
        else:
            candidate_ids, probs = self._distribution(logits)
            token = int(candidate_ids[self._rng.choice(len(probs), p=probs)])
        self._remember(token)
        return token

    def verify(self, logits: np.ndarray, draft: int) -> tuple[int, bool]:
        """Speculative decoding's rule for a drafted token: the token to emit, and whether it is the draft.

        Greedy: the draft is kept when it is the argmax. Sampling: the drafters here propose one token with
        certainty (q = 1 on the draft), so the draft is kept with probability p(draft), else a token is drawn
        from p with the draft removed (``max(0, p - q)`` renormalized): the emitted token is distributed exactly
        as :meth:`sample` would draw it (Leviathan et al., 2023; Chen et al., 2023).
        """
        logits = self._penalized(logits)
        if self.params.greedy:
            token = int(np.argmax(logits))
        else:
            candidate_ids, probs = self._distribution(logits)
            where = np.nonzero(candidate_ids == draft)[0]
            p_draft = float(probs[where[0]]) if len(where) else 0.0
            if self._rng.random() < p_draft:
                token = draft
            else:
                residual = probs.copy()
                residual[where] = 0.0
                token = int(candidate_ids[self._rng.choice(len(residual), p=residual / residual.sum())])
        self._remember(token)
        return token, token == draft

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        """llama.cpp's order: the repetition penalty on the tokens in the window, then frequency and presence."""
        params = self.params
        if not params.penalizes:
            return logits
        counts = self._counts[: logits.shape[0]]
        seen = counts > 0
        logits = logits.astype(np.float32, copy=True)
        if params.repetition_penalty != 1.0:
            penalized = logits[seen]
            logits[seen] = np.where(penalized > 0, penalized / params.repetition_penalty,
                                    penalized * params.repetition_penalty)
        if params.frequency_penalty or params.presence_penalty:
            logits -= params.frequency_penalty * counts + params.presence_penalty * seen
        return logits

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and their probabilities after temperature, top-k and top-p (most likely first)."""
        params = self.params
        logits = logits.astype(np.float64)
        # shift before dividing: a tiny temperature then sends the others to -inf, never the best to inf (NaN)
        scaled = (logits - logits.max()) / params.temperature
        if params.top_k and params.top_k < scaled.shape[0]:
            candidate_ids = np.argpartition(-scaled, params.top_k - 1)[: params.top_k]
        else:
            candidate_ids = np.arange(scaled.shape[0])
        candidate_logits = scaled[candidate_ids]
        order = np.argsort(-candidate_logits, kind="stable")
        candidate_ids, candidate_logits = candidate_ids[order], candidate_logits[order]
        probs = np.exp(candidate_logits - candidate_logits[0])
        probs /= probs.sum()
        if params.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cutoff = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
            candidate_ids, probs = candidate_ids[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return candidate_ids, probs
