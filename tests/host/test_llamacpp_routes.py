"""llama.cpp's tokenize and detokenize, as Lemonade 11 serves them: no model named, the most recently used loaded
model's tokenizer answers, a 400 with none loaded."""

from __future__ import annotations

import httpx


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=60)


def test_tokenize_and_detokenize_round_trip_under_every_prefix(isolated_plugin_server):
    base = isolated_plugin_server
    tokens = _post(base, "/v1/tokenize", {"content": "Lemons are yellow."}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    for prefix in ("/api/v1", "/api/v0", "/v0"):
        assert _post(base, f"{prefix}/tokenize", {"content": "Lemons are yellow."}).json()["tokens"] == tokens
    assert _post(base, "/v1/detokenize", {"tokens": tokens}).json() == {"content": "Lemons are yellow."}


def test_pieces_spell_the_text_and_special_tokens_parse_unless_asked_not_to(isolated_plugin_server):
    base = isolated_plugin_server
    pieces = _post(base, "/v1/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world" and all(isinstance(p["id"], int) for p in pieces)
    special = _post(base, "/v1/tokenize", {"content": "<|im_end|>"}).json()["tokens"]
    as_text = _post(base, "/v1/tokenize", {"content": "<|im_end|>", "parse_special": False}).json()["tokens"]
    assert len(special) == 1 and len(as_text) > 1
    assert _post(base, "/v1/detokenize", {"tokens": as_text}).json()["content"] == "<|im_end|>"


def test_slots_list_one_slot_per_place_and_their_actions_answer_501_naming_the_prefix_store(isolated_plugin_server):
    base = isolated_plugin_server
    _post(base, "/v1/tokenize", {"content": "warm"})
    slots = httpx.get(f"{base}/v1/slots", timeout=30).json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and not any(s["is_processing"] for s in slots), "--parallel 4"
    for action in ("save", "restore", "erase"):
        reply = httpx.post(f"{base}/v1/slots/0?action={action}", json={"filename": "x.bin"}, timeout=30)
        assert reply.status_code == 501 and "prefix" in reply.json()["error"]["message"], action
    assert httpx.post(f"{base}/v1/slots/0?action=dance", timeout=30).status_code == 400
    assert httpx.post(f"{base}/v1/slots/4?action=erase", timeout=30).status_code == 400


def test_token_ids_outside_the_vocabulary_are_a_400_naming_tokens(isolated_plugin_server):
    reply = _post(isolated_plugin_server, "/v1/detokenize", {"tokens": [1, -5, 10**9]})
    assert reply.status_code == 400 and reply.json()["error"]["details"]["param"] == "tokens"
    assert _post(isolated_plugin_server, "/v1/tokenize", {"add_special": True}).status_code == 400   # no content


def test_with_no_model_loaded_tokenize_is_a_400_and_loads_nothing(isolated_plugin_server):
    base = isolated_plugin_server
    httpx.post(f"{base}/api/v1/unload", json={}, timeout=60).raise_for_status()
    reply = _post(base, "/v1/tokenize", {"content": "Hi"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "no_model_loaded"
    assert httpx.get(f"{base}/api/v1/health", timeout=10).json()["all_models_loaded"] == []
