"""llama.cpp's compatibility routes that Lemonade 11 serves: ``/tokenize``, ``/detokenize`` and ``/slots``.

Like Lemonade's (its ``docs/api/llamacpp.md``), they name no model: the most recently used loaded model answers,
and with no model loaded the answer is a 400. They use none of the model's context and never load one.

A loaded model here has one slot: it runs one generation at a time (the rest queue). Its prompt cache is the
plugin's prefix store and warm cache, kept and found by content, not a slot file: the slot actions answer what
llama.cpp answers without ``--slot-save-path``, a 501, saying so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from lemonade_inferos.host.schemas import DetokenizeRequest, TokenizeRequest
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute

router = APIRouter(route_class=OffLoopJSONRoute)


def _current_model(request: Request) -> Any:
    models = request.app.state.host.models
    model = models.loaded.get(models.current) if models.current else None
    if model is None:
        raise APIError(400, "no_model_loaded", "no model is loaded: load one (POST /api/v1/load) or send it a "
                       "request first; tokenize answers with the most recently used model's tokenizer")
    return model


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tokenizer = _current_model(request).tokenizer
    ids = await asyncio.to_thread(tokenizer.encode, body.content, body.add_special, body.parse_special)
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]}


@router.get("/slots")
async def slots(request: Request):
    """One slot per place of the model (``--parallel``), the first ``running`` of them processing."""
    model = _current_model(request)
    gate = model.gate
    return [{"id": i, "id_task": i if i < gate.running else -1, "is_processing": i < gate.running,
             "n_ctx": model.ctx_size, "speculative": False} for i in range(gate.parallel)]


@router.post("/slots/{slot_id}")
async def slot_action(slot_id: int, request: Request, action: str = ""):
    if action not in ("save", "restore", "erase"):
        raise APIError(400, "invalid_request", "action is save, restore or erase", param="action")
    places = _current_model(request).gate.parallel
    if not 0 <= slot_id < places:
        raise APIError(400, "invalid_request", f"no slot {slot_id}: the model has slots 0..{places - 1} "
                       "(--parallel)", param="id")
    raise APIError(501, "not_supported", f"slot {action} is not available: this host keeps prompt caches in its "
                   "prefix store (--inferos-prefix-spill-mb, the prefix_spill_dir setting), reused by content, not "
                   "in slot files (llama.cpp's --slot-save-path)", action=action)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    model = _current_model(request)
    vocab = model.spec.vocab_size if model.spec is not None else None
    bad = [t for t in body.tokens if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise APIError(400, "invalid_request", f"token ids must be in 0..{vocab - 1 if vocab else 'vocab'}; "
                       f"got {bad[:5]}", param="tokens")
    return {"content": await asyncio.to_thread(model.tokenizer.decode, body.tokens, False)}
