"""A draft model for speculative decoding: a smaller model with the same tokenizer drafts greedily.

Its own dense cache is kept in step with the target's sequence: before each draft the cache is cut back to the
common prefix (rejected draft tokens leave it) and only the missing tokens run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from lemonade_inferos.engine.binding import StepBinding
from lemonade_inferos.engine.kv import CacheFullError, common_prefix

if TYPE_CHECKING:
    from lemonade_inferos.engine.ort_engine import OrtEngine


class ModelDrafter:
    """Greedy drafts from ``engine`` (the draft model's), in its own cache."""

    def __init__(self, engine: "OrtEngine") -> None:
        self.engine = engine
        self.cache = engine.new_cache()
        self.binding = StepBinding(engine, self.cache)
        self.ids: list[int] = []

    def extend(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in token_ids)

    def propose(self, k: int) -> list[int]:
        if k <= 0 or not self.ids:
            return []
        self.cache.truncate(common_prefix(self.cache.token_ids, self.ids))
        logits = self.engine.prefill(self.binding, self.ids[self.cache.num_tokens:])
        draft = [int(np.argmax(logits))]
        step = np.zeros((1, 1), dtype=np.int64)
        while len(draft) < k:
            step[0, 0] = draft[-1]
            try:
                draft.append(int(np.argmax(self.binding.run(step, all_logits=False))))
            except CacheFullError:
                break
        return draft
