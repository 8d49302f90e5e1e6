"""Incremental detokenization and stop strings.

Each new token is decoded within a short window of the tokens before it (prefix/read
offsets, as in TGI and vLLM), so a step costs O(window), not O(output). Text is released
only once it no longer ends in U+FFFD, so a character split over several byte tokens never
leaves as a broken piece. With stop strings, the last len(longest stop) - 1 characters are
held back until they cannot start a stop string; the stop string itself is never emitted.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded before the output, so the first output token gets its leading space right.
CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # decoded output so far (truncated at a stop string)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int, *, skip: bool = False) -> str:
        """Append one generated token; return the text that may be released now."""
        if self.stopped:
            return ""
        if not skip:
            self.ids.append(token_id)
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                old_len = len(self.text)
                self.text += full[len(prefix) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                self._check_stop(old_len)
        return self._release(final=self.stopped)

    def _check_stop(self, old_len: int) -> None:
        if not self.stop:
            return
        search_from = max(0, old_len - self.hold)
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def flush(self) -> str:
        """At finish: release what was held back, including a trailing partial character."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            old_len = len(self.text)
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
            self._check_stop(old_len)  # a stop string may lie in the tail ("x" of a token "x" + a partial byte)
        return self._release(final=True)
