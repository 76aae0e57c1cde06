"""Request bodies parsed as JSON: bounded in depth, UTF-8 checked with its offset, lone surrogates made text."""

from __future__ import annotations

import json

import pytest

from lemonade_inferos.http.json_body import MAX_DEPTH, parse_json_body


def test_a_lone_surrogate_becomes_the_replacement_character_and_a_pair_stays_the_character_it_encodes():
    body = rb'{"content": "a\ud800b", "emoji": "\ud83d\ude00", "k\udc00": ["x\udfff"]}'
    assert parse_json_body(body) == {"content": "a\ufffdb", "emoji": "\U0001F600", "k\ufffd": ["x\ufffd"]}
    json.dumps(parse_json_body(body)).encode("utf-8")  # every string is text UTF-8 can encode


def test_a_top_level_string_with_a_lone_surrogate_is_repaired_too():
    assert parse_json_body(rb'"\udbff"') == "\ufffd"


def test_invalid_utf8_is_refused_with_its_offset():
    with pytest.raises(json.JSONDecodeError, match=r"not UTF-8 \(byte 0xff at offset 13\)") as caught:
        parse_json_body(b'{"content": "\xff"}')
    assert caught.value.pos == 13


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 100_000])
def test_a_body_nested_deeper_than_the_limit_is_refused_however_deep(depth):
    with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_DEPTH}"):
        parse_json_body(b"[" * depth + b"]" * depth)
    with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_DEPTH}"):
        parse_json_body(b'{"a":' * depth + b"1" + b"}" * depth)


def test_a_body_exactly_as_deep_as_the_limit_is_parsed():
    assert parse_json_body(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None


def test_text_that_is_not_json_is_the_parsers_error():
    with pytest.raises(json.JSONDecodeError):
        parse_json_body(b'{"a": ')
