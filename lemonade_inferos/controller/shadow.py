"""Shadow passes: re-score the tail of a finished sequence under the active KV plan and under full precision.

The scored tokens are the request's own (prompt tail and generated tokens); both
passes feed the same ids in chunks no longer than the recent window, so the
plan's quantized history is what the scored tokens attend over.

A plan in the INT8 live form is compared with a plain cache of that form (the
float graph is not kept loaded beside it: that would cost the memory the form
saves), and the form's own cost, measured against the float graph when its scales
were calibrated, is added to the plan's NLL.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

from lemonade_inferos.controller.guard import ShadowSample
from lemonade_inferos.eval.scoring import log_softmax
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import KVPlan


def shadow_score(engine: Any, token_ids: list[int], plan: KVPlan, rope: Any, max_tier: int,
                 max_tokens: int = 512, score_tokens: int = 128,
                 before_chunk: Callable[[], object] | None = None) -> ShadowSample | None:
    """NLL of the last ``score_tokens`` of ``token_ids`` (at most ``max_tokens`` in all) under both caches.

    ``before_chunk`` runs before each chunk (the plugin waits there until no request is in flight);
    when it returns False the pass is abandoned (None).
    """
    ids = token_ids[-max_tokens:]
    if len(ids) <= plan.recent_window + plan.block_size + 1:
        return None  # nothing would be quantized: no signal
    layout = engine.layout_for(plan)
    planned = TieredKVCache(layout, replace(plan), rope)
    planned.max_tier = max_tier
    full = engine.new_cache(layout)
    chunk = plan.recent_window
    first_scored = len(ids) - 1 - min(score_tokens, len(ids) - 1)
    nll_plan, nll_fp = [], []
    for start in range(0, len(ids) - 1, chunk):
        if before_chunk is not None and before_chunk() is False:
            return None
        piece = ids[start:start + chunk]
        targets = np.asarray(ids[start + 1:start + 1 + len(piece)])
        lp_plan = log_softmax(engine.forward(piece, planned))[: len(targets)]
        lp_fp = log_softmax(engine.forward(piece, full))[: len(targets)]
        rows = np.arange(len(targets))
        keep = (start + rows) >= first_scored
        nll_plan.extend((-lp_plan[rows, targets])[keep].tolist())
        nll_fp.extend((-lp_fp[rows, targets])[keep].tolist())
    if not nll_plan:
        return None
    live_cost = engine.live_form_delta_nll(layout)
    return ShadowSample(float(np.mean(nll_plan)) + live_cost, float(np.mean(nll_fp)), len(nll_plan))
