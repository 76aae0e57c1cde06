"""llama.cpp's compatibility routes that Lemonade 11 serves: ``/tokenize`` and ``/detokenize``.

Like Lemonade's (its ``docs/api/llamacpp.md``), they name no model: the most recently used loaded model's tokenizer
answers, and with no model loaded the answer is a 400. They use none of the model's context and never load one.
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


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    model = _current_model(request)
    vocab = model.spec.vocab_size if model.spec is not None else None
    bad = [t for t in body.tokens if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise APIError(400, "invalid_request", f"token ids must be in 0..{vocab - 1 if vocab else 'vocab'}; "
                       f"got {bad[:5]}", param="tokens")
    return {"content": await asyncio.to_thread(model.tokenizer.decode, body.tokens, False)}
