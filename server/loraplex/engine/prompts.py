"""Prompts to token ids: text, or chat messages with the adapter's own template, else the base's.

`Prompts` owns the base tokenizer for every thread but the engine's detokenizers: one lock,
as a fast tokenizer must not encode on two threads at once.

    messages ──┬─ the adapter's template (chat_template.jinja / tokenizer_config.json in its directory)
               ├─ else the base model's (its tokenizer's chat_template)
               └─ else InvalidFieldError("messages"): send a prompt instead
            ──> tokenizer.apply_chat_template(add_generation_prompt=True) ──> prompt token ids

The adapter's template is read with its spec at registration (lora/adapter_spec.py), so a
version's template never changes under it. The base tokenizer renders and tokenizes either
way: adapters cannot bring new tokens (embedding targets are refused). Content is text;
transports turn their own message shapes (OpenAI's content parts, the proto's ChatMessage)
into ChatMessage first. No torch here.

Token texts (for logprobs) are each id decoded alone, special tokens included, as vLLM's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from loraplex.rules import InvalidFieldError

MAX_MESSAGES = 4096
CHAT_ROLE_MAX_LEN = 64


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant", ... as the template knows them
    content: str


def check_messages(messages: Sequence[ChatMessage], field: str = "messages") -> None:
    if not messages:
        raise InvalidFieldError(field, f"{field} must hold at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidFieldError(field, f"{field} holds {len(messages)} messages; at most {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        if not 1 <= len(m.role) <= CHAT_ROLE_MAX_LEN:
            raise InvalidFieldError(f"{field}[{i}].role", f"{field}[{i}].role must have 1-{CHAT_ROLE_MAX_LEN} characters")


def pick_template(adapter_template: str | None, base_template: str | None, adapter_id: str | None) -> str:
    """The template a request uses: its adapter's own, else the base model's."""
    template = adapter_template or base_template
    if template is None:
        who = "the base model" if adapter_id is None else f"adapter {adapter_id!r} and the base model"
        raise InvalidFieldError(
            "messages",
            f"{who} have no chat template (chat_template.jinja or tokenizer_config.json's chat_template); "
            "send a prompt instead",
        )
    return template


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], template: str) -> list[int]:
    """The prompt ids transformers' apply_chat_template makes (with the generation prompt)."""
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # raise_exception in the template, a bad template
        raise InvalidFieldError("messages", f"the chat template refused the messages: {e}") from None
    return [int(t) for t in ids]


class Prompts:
    """Text and chats to prompt ids, ids to token texts, a request's ids checked against the
    vocabulary and the engine's longest sequence; safe to call from any thread.

    max_seq_len: the longest sequence the engine holds (max_model_len, or less where the KV
    cache is smaller); a prompt needs room for one new token under it.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_seq_len: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.max_model_len = max_model_len
        self._lock = threading.Lock()
        self._texts: dict[int, str] = {}

    def request_ids(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        """A request's prompt ids from exactly one of text and ids; InvalidFieldError names what is wrong."""
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidFieldError("prompt", "give exactly one of prompt and prompt_token_ids")
        field = "prompt" if prompt_token_ids is None else "prompt_token_ids"
        if prompt_token_ids is not None:
            ids = [int(t) for t in prompt_token_ids]
            self.check_vocab(field, ids)
        else:
            ids = self.encode(prompt or "")
        if not ids:
            raise InvalidFieldError(field, "the prompt is empty")
        # The one prompt-length rule: the longest sequence this engine holds, with room to generate.
        if len(ids) >= self.max_seq_len:
            bound = "max_model_len" if self.max_seq_len == self.max_model_len else "the KV cache (num_kv_blocks x block_size)"
            raise InvalidFieldError(
                field,
                f"{field} has {len(ids)} tokens; {bound} holds {self.max_seq_len} (room for at least one new token needed)",
            )
        return ids

    def check_vocab(self, field: str, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidFieldError(field, f"{field} has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def chat(self, messages: Sequence[ChatMessage], adapter_template: str | None, adapter_id: str | None) -> list[int]:
        """The prompt ids of a chat for an adapter (None: the base model): Jinja and tokenizer work."""
        check_messages(messages)
        template = pick_template(adapter_template, self.tokenizer.chat_template, adapter_id)
        with self._lock:
            return render_chat(self.tokenizer, messages, template)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded alone (cached: a vocabulary's worth at most)."""
        missing = [i for i in ids if i not in self._texts]
        if missing:
            with self._lock:
                for i in missing:
                    self._texts[i] = self.tokenizer.decode([i], skip_special_tokens=False)
        return [self._texts[i] for i in ids]
