"""Incremental detokenization: deltas add up to the full decode, never carry a broken
character, and stop strings are cut and never leak."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.engine.detokenizer import Detokenizer

TEXTS = ["The sun rises over the hills.", "naïve café — 東京 🚀 ok", "emoji 🙂🙃 and ünïcödé!"]


def _stream(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, tokenizer("Q:")["input_ids"], stop)
    deltas = [detok.add(t) for t in ids]
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_full_decode_without_broken_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    deltas, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 127 for c in text):  # byte-level pieces alone really are broken
        assert any("\ufffd" in p for p in pieces)


def test_stop_string_is_cut_and_held_back(tokenizer: Any) -> None:
    text = "one two three four five"
    ids = tokenizer(text)["input_ids"]
    deltas, detok = _stream(tokenizer, ids, stop=("three",))
    assert detok.stopped
    assert "".join(deltas) == "one two "
    assert all("thr" not in d for d in deltas)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("five", "one two three four "),  # the trailing space was held back when the stop completed
        ("three", "one two "),
        ("r f", "one two three fou"),
        ("one", ""),
        ("six", "one two three four five "),
    ],
)
def test_stop_string_releases_all_the_text_before_it(tokenizer: Any, stop: str, expected: str) -> None:
    ids = tokenizer("one two three four five six")["input_ids"]
    detok = Detokenizer(tokenizer, tokenizer("Q:")["input_ids"], (stop,))
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.stopped:
            break
    assert detok.stopped and "".join(deltas) == expected  # released by the step that stopped, no flush
    assert detok.flush() == ""


def test_stop_string_across_tokens_and_unmatched_tail(tokenizer: Any) -> None:
    ids = tokenizer("abc abd abe")["input_ids"]
    deltas, detok = _stream(tokenizer, ids, stop=("abf", "zzz"))
    assert not detok.stopped and "".join(deltas) == "abc abd abe"


def test_skipped_stop_token_adds_no_text(tokenizer: Any) -> None:
    detok = Detokenizer(tokenizer, [5])
    assert detok.add(tokenizer.eos_token_id, skip=True) == ""
    assert detok.flush() == ""
