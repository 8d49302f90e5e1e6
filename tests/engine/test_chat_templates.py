"""Chat templates per adapter: the adapter's own (chat_template.jinja, or tokenizer_config.json's
chat_template), else the base model's, else an error naming `messages`. Prompt ids are compared
with transformers' own apply_chat_template on the same template."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, make_engine
from loraplex.engine.prompts import ChatMessage, Prompts
from loraplex.model.demo import CHAT_TEMPLATE
from loraplex.rules import InvalidFieldError

OWN_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONFIG_TEMPLATE = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}BOT:"
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Who are you?")]


def _expected(tokenizer: Any, template: str, messages: list[ChatMessage] = MESSAGES) -> list[int]:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    ids = tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=True, return_dict=False)
    return list(ids)


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("chat-adapters")
    src = tiny_llama.adapters["qv-r4"]
    for name in ("own-jinja", "own-config", "plain"):
        shutil.copytree(src, root / name)
    (root / "own-jinja" / "chat_template.jinja").write_text(OWN_TEMPLATE)
    named = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": CONFIG_TEMPLATE}]
    (root / "own-config" / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    engine = make_engine(tiny_llama, register=False, roots=(str(root),), num_blocks=32)
    for name in ("own-jinja", "own-config", "plain"):
        engine.register_adapter(name, name)
    engine.root = root
    yield engine
    engine.close()


def test_each_adapter_gets_its_own_template_else_the_base(engine: Any) -> None:
    tok = engine.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE  # the tiny models carry the demo template
    cases = {"own-jinja": OWN_TEMPLATE, "own-config": CONFIG_TEMPLATE, "plain": CHAT_TEMPLATE, None: CHAT_TEMPLATE}
    for adapter_id, template in cases.items():
        version = engine.lookup_adapter(adapter_id) if adapter_id else None
        assert engine.chat_prompt_ids(MESSAGES, version) == _expected(tok, template), adapter_id
    # The three templates really give three different prompts.
    assert len({tuple(_expected(tok, t)) for t in (OWN_TEMPLATE, CONFIG_TEMPLATE, CHAT_TEMPLATE)}) == 3


def test_a_changed_template_is_a_new_version(engine: Any) -> None:
    before = engine.lookup_adapter("own-jinja")
    assert engine.register_adapter("own-jinja", "own-jinja").version == before.version  # same content
    path = Path(engine.root) / "own-jinja" / "chat_template.jinja"
    path.write_text(OWN_TEMPLATE.replace("<assistant>", "<bot>"))
    try:
        after = engine.register_adapter("own-jinja", "own-jinja")
        assert after.version > before.version
        ids = engine.chat_prompt_ids(MESSAGES, engine.lookup_adapter("own-jinja"))
        assert ids == _expected(engine.tokenizer, OWN_TEMPLATE.replace("<assistant>", "<bot>"))
    finally:
        path.write_text(OWN_TEMPLATE)
        engine.register_adapter("own-jinja", "own-jinja")


def _prompts(tokenizer: Any) -> Prompts:
    """Prompts with no length limit to speak of (these tests are about templates)."""
    return Prompts(tokenizer, vocab_size=len(tokenizer), max_seq_len=1 << 20, max_model_len=1 << 20)


def test_no_template_anywhere_is_an_error_naming_messages(tokenizer: Any) -> None:
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(InvalidFieldError, match="no chat template") as e:
        _prompts(bare).chat(MESSAGES, None, "acme/x")
    assert e.value.field == "messages" and "acme/x" in str(e.value)
    assert _prompts(bare).chat(MESSAGES, OWN_TEMPLATE, "acme/x") == _expected(tokenizer, OWN_TEMPLATE)


def test_bad_messages_are_refused_naming_the_field(tokenizer: Any) -> None:
    prompts = _prompts(tokenizer)
    with pytest.raises(InvalidFieldError) as e:
        prompts.chat([ChatMessage("tool", "x")], None, None)  # the demo template raises for other roles
    assert e.value.field == "messages" and "roles are system, user and assistant" in str(e.value)
    with pytest.raises(InvalidFieldError) as e:
        prompts.chat([], None, None)
    assert e.value.field == "messages"
    with pytest.raises(InvalidFieldError) as e:
        prompts.chat([ChatMessage("user", "hi"), ChatMessage("", "x")], None, None)
    assert e.value.field == "messages[1].role"
