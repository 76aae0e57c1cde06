"""Next-token scoring shared by ``inferos eval`` and the controller's quality guard."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lemonade_inferos.engine.sampling import log_softmax  # noqa: F401 (scoring's callers use it from here)


@dataclass
class ScoreAccumulator:
    """Running NLL of a plan, and its divergence from the full-precision reference on the same tokens."""

    nll: list[float] = field(default_factory=list)
    ref_nll: list[float] = field(default_factory=list)
    kld: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)

    def add(self, logprobs: np.ndarray, ref_logprobs: np.ndarray, targets: np.ndarray) -> None:
        """``logprobs``/``ref_logprobs`` ``[n, vocab]`` predict ``targets`` ``[n]``."""
        rows = np.arange(len(targets))
        self.nll.extend((-logprobs[rows, targets]).tolist())
        self.ref_nll.extend((-ref_logprobs[rows, targets]).tolist())
        self.kld.extend((np.exp(ref_logprobs) * (ref_logprobs - logprobs)).sum(-1).tolist())
        self.top1.extend((logprobs.argmax(-1) == ref_logprobs.argmax(-1)).tolist())

    @property
    def count(self) -> int:
        return len(self.nll)

    @property
    def ppl(self) -> float:
        return float(np.exp(np.mean(self.nll)))

    @property
    def ppl_ref(self) -> float:
        return float(np.exp(np.mean(self.ref_nll)))

    @property
    def delta_nll(self) -> float:
        return float(np.mean(self.nll) - np.mean(self.ref_nll))

    def summary(self) -> dict[str, float]:
        return {"ppl": self.ppl, "ppl_fp": self.ppl_ref, "delta_ppl": self.ppl - self.ppl_ref,
                "delta_nll": self.delta_nll, "kld": float(np.mean(self.kld)), "top1": float(np.mean(self.top1)),
                "scored_tokens": self.count}
