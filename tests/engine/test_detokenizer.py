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


# What mutation testing (make mutants) found untested: the context window for tokenizers whose
# decode depends on the tokens before (SentencePiece-style), special tokens in the output, the
# release schedule with and without stop strings, the first of two stop strings in one piece,
# and the tail flushed at finish.


@pytest.fixture(scope="module")
def metaspace() -> Any:
    """A BPE tokenizer with a Metaspace pre-tokenizer and decoder, as Llama's and Mistral's: a
    token's leading space ("▁two") is dropped when it is decoded first, so the output's first
    token needs the prompt's last tokens before it to get its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["one two three four five xoxo"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _joined(tokenizer: Any, prompt: list[int], output: list[int], stop: tuple[str, ...] = ()) -> str:
    detok = Detokenizer(tokenizer, prompt, stop)
    text = "".join(detok.add(t) for t in output)
    return text + detok.flush()


def test_first_output_token_gets_its_space_from_the_prompt(metaspace: Any) -> None:
    ids = metaspace("one two three")["input_ids"]
    assert metaspace.decode(ids[1:]) == "two three"  # decoded alone, the space is lost
    expected = metaspace.decode(ids)[len(metaspace.decode(ids[:1])) :]
    assert expected == " two three"
    assert _joined(metaspace, ids[:1], ids[1:]) == expected


def test_special_tokens_in_the_output_add_no_text_and_keep_the_context(metaspace: Any) -> None:
    ids = metaspace("one two three")["input_ids"]
    output = [metaspace.bos_token_id, ids[1], metaspace.eos_token_id, ids[2]]
    assert _joined(metaspace, ids[:1], output) == " two three"


def test_text_is_released_as_soon_as_it_is_whole_without_stop_strings(tokenizer: Any) -> None:
    ids = tokenizer("one two three four")["input_ids"]
    detok = Detokenizer(tokenizer, tokenizer("Q:")["input_ids"])
    released = ""
    for k, t in enumerate(ids):
        released += detok.add(t)
        assert released == tokenizer.decode(ids[: k + 1])


def test_stop_strings_hold_back_only_their_length_minus_one(tokenizer: Any) -> None:
    ids = tokenizer("one two three four")["input_ids"]
    detok = Detokenizer(tokenizer, tokenizer("Q:")["input_ids"], ("xyz", "qq"))
    released = ""
    for k, t in enumerate(ids):
        released += detok.add(t)
        so_far = tokenizer.decode(ids[: k + 1])
        assert released == so_far[: max(0, len(so_far) - 2)]
    assert released + detok.flush() == tokenizer.decode(ids)


def test_a_piece_holding_a_stop_string_twice_is_cut_at_the_first(metaspace: Any) -> None:
    (xoxo,) = metaspace("xoxo")["input_ids"]  # one token: " xoxo" after a prompt
    prompt = metaspace("one")["input_ids"]
    detok = Detokenizer(metaspace, prompt, ("xo",))
    assert detok.add(xoxo) == " " and detok.stopped


def test_flush_releases_a_trailing_partial_character(tokenizer: Any) -> None:
    ids = tokenizer(" café")["input_ids"][:-1]  # the stream ends inside "é"
    assert tokenizer.decode(ids).endswith("\ufffd")
    assert _joined(tokenizer, tokenizer("Q:")["input_ids"], ids, stop=("zz",)) == tokenizer.decode(ids)


def test_flush_finds_a_stop_string_in_the_tail() -> None:
    from loraplex.model.demo import build_tokenizer

    tok = build_tokenizer(corpus="xé " * 50 + "one two", vocab_size=300)
    x_partial = tok.convert_tokens_to_ids("xÃ")  # "x" and the first byte of "é"
    assert tok.decode([x_partial]) == "x\ufffd"
    detok = Detokenizer(tok, tok("one")["input_ids"], ("x",))
    assert detok.add(x_partial) == ""  # held: the piece ends in a broken character
    assert detok.flush() == "" and detok.stopped
