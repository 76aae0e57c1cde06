"""Picking the next token: the sampler behind the output's grammar, for one token or a speculative draft."""

from __future__ import annotations

import numpy as np

from lemonade_inferos.engine.guidance import TokenConstraint
from lemonade_inferos.engine.sampling import Sampler


class TokenPicker:
    """The sampler, behind the output's grammar when there is one: each row of logits is masked by the grammar's
    state after the tokens before it, and every token picked is fed to the grammar."""

    def __init__(self, sampler: Sampler, constraint: TokenConstraint | None) -> None:
        self.sampler, self.constraint = sampler, constraint

    def sample(self, logits: np.ndarray) -> int:
        if self.constraint is None:
            return self.sampler.sample(logits)
        token = self.sampler.sample(self.constraint.apply(logits))
        self.constraint.consume(token)
        return token

    def accepted(self, rows: np.ndarray, draft: list[int]) -> list[int]:
        """The draft tokens the model keeps, then one more token: the correction of the first rejected one, or
        (all kept) the token after the draft from the last row. A draft token the grammar forbids is rejected; a
        token that completes the grammar is the last (the loop emits it and ends)."""
        sampler, constraint = self.sampler, self.constraint
        outs: list[int] = []
        for index, proposed in enumerate(draft):
            row = rows[index] if constraint is None else constraint.apply(rows[index])
            token, kept = sampler.verify(row, proposed)
            outs.append(token)
            if constraint is not None:
                constraint.consume(token)
                if constraint.finished:
                    return outs
            if not kept:
                return outs
        outs.append(self.sample(rows[len(draft)]))
        return outs

    @property
    def finished(self) -> bool:
        return self.constraint is not None and self.constraint.finished
