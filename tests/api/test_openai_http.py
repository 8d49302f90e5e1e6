"""The OpenAI-compatible HTTP API on a real server on 127.0.0.1, through the official `openai` SDK.

Each HTTP answer is compared with the gRPC answer for the same request (same process, same
engine loop), greedy chat tokens and logprobs with PEFT on the prompt transformers'
apply_chat_template makes with the adapter's own template (or the base's), and each error
status with the SDK's exception for it."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from conftest import TinyModel, engine_config, wait_idle
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import RequestStatus
from loraplex_client import AsyncClient, Client

SECRET = "s3cret"
OWN_TEMPLATE = (  # acme/chatty's own template: different prompt ids from the base's for the same chat
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PEFT_NAME = {"qv-r4": "qv-r4", "acme/chatty": "all-r8-rslora", None: None}  # server id -> PEFT adapter
BASE = "model"  # the served model name: the model directory's name
PROMPT = "The sun rises over the"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def adapter_root(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http-adapters")
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "qv-r4")  # no template: the base's applies
    shutil.copytree(tiny_llama.adapters["all-r8-rslora"], root / "acme" / "chatty")
    (root / "acme" / "chatty" / "chat_template.jinja").write_text(OWN_TEMPLATE)
    shutil.copytree(tiny_llama.adapters["attn-r8-layer0"], root / "spare")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, adapter_root: Path) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, roots=(str(adapter_root),), max_loras=2)
    api = ApiConfig(port=0, metrics_port=0, http_port=ANY_PORT, auth_tokens=(SECRET,))
    background = BackgroundServer(ServerConfig(engine=config, api=api), Engine(config))
    background.start()
    for adapter_id in ("qv-r4", "acme/chatty"):
        background.server.engine.register_adapter(adapter_id, adapter_id)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def oai(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=_url(server, "/v1"), api_key=SECRET, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc(server: BackgroundServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.server.port}", token=SECRET, timeout=120) as client:
        yield client


def _url(server: BackgroundServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def _post(server: BackgroundServer, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        _url(server, path), data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _usage(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _completion(oai: openai.OpenAI, model: str, stream: bool, **kw: Any) -> dict[str, Any]:
    """text, token ids, finish reason and usage of one choice, streamed or not."""
    if not stream:
        r = oai.completions.create(model=model, prompt=PROMPT, **kw)
        c = r.choices[0]
        return {"text": c.text, "ids": c.token_ids, "finish": c.finish_reason, "usage": _usage(r.usage)}
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw))
    body = [c.choices[0] for c in chunks if c.choices]
    return {
        "text": "".join(c.text for c in body),
        "ids": [t for c in body for t in c.token_ids],
        "finish": body[-1].finish_reason,
        "usage": _usage(chunks[-1].usage),
    }


def _chat(oai: openai.OpenAI, model: str, stream: bool, **kw: Any) -> dict[str, Any]:
    if not stream:
        r = oai.chat.completions.create(model=model, messages=MESSAGES, **kw)
        c = r.choices[0]
        assert c.message.role == "assistant"
        return {"text": c.message.content, "ids": c.token_ids, "finish": c.finish_reason, "usage": _usage(r.usage)}
    chunks = list(oai.chat.completions.create(model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw))
    body = [c.choices[0] for c in chunks if c.choices]
    assert body[0].delta.role == "assistant"
    return {
        "text": "".join(c.delta.content or "" for c in body),
        "ids": [t for c in body for t in (getattr(c, "token_ids", None) or [])],
        "finish": body[-1].finish_reason,
        "usage": _usage(chunks[-1].usage),
    }


def _as_grpc(result: Any) -> dict[str, Any]:
    u = result.usage
    return {
        "text": result.text, "ids": result.token_ids, "finish": str(result.finish_reason),
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.generated_tokens,
                  "total_tokens": u.prompt_tokens + u.generated_tokens},
    }


def test_models_lists_the_base_and_the_adapters(oai: openai.OpenAI) -> None:
    models = {m.id: m for m in oai.models.list().data}
    assert {BASE, "qv-r4", "acme/chatty"} <= set(models)
    assert models[BASE].parent is None and models[BASE].max_model_len == 512
    assert models["acme/chatty"].parent == BASE and models["acme/chatty"].root == "acme/chatty"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("adapter", [None, "qv-r4", "acme/chatty"])
def test_completions_equal_grpc(oai: openai.OpenAI, grpc: Client, adapter: str | None, stream: bool) -> None:
    http = _completion(oai, adapter or BASE, stream, max_tokens=10, **GREEDY)
    expected = _as_grpc(grpc.generate(PROMPT, adapter_id=adapter, max_new_tokens=10, temperature=0.0, ignore_eos=True))
    assert http == expected
    assert len(http["ids"]) == 10 and http["finish"] == "length"
    # sampled with a seed: the same draw through either door
    kw = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "extra_body": {"top_k": 40, "ignore_eos": True, "return_token_ids": True}}
    http = _completion(oai, adapter or BASE, stream, max_tokens=8, **kw)
    expected = _as_grpc(grpc.generate(PROMPT, adapter_id=adapter, max_new_tokens=8, temperature=0.9, top_p=0.95, top_k=40, seed=11, ignore_eos=True))
    assert http == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("adapter", [None, "qv-r4", "acme/chatty"])
def test_chat_completions_equal_grpc(oai: openai.OpenAI, grpc: Client, adapter: str | None, stream: bool) -> None:
    http = _chat(oai, adapter or BASE, stream, max_tokens=10, **GREEDY)
    expected = _as_grpc(grpc.generate(messages=MESSAGES, adapter_id=adapter, max_new_tokens=10, temperature=0.0, ignore_eos=True))
    assert http == expected
    assert len(http["ids"]) == 10


def test_n_choices_use_seed_plus_index(oai: openai.OpenAI, grpc: Client) -> None:
    r = oai.completions.create(model="qv-r4", prompt=PROMPT, max_tokens=6, n=3, seed=5, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.text == grpc.generate(PROMPT, adapter_id="qv-r4", max_new_tokens=6, temperature=1.0, seed=5 + c.index, ignore_eos=True).text
    assert len({c.text for c in r.choices}) > 1
    assert r.usage.prompt_tokens == grpc.tokenize(PROMPT).count and r.usage.completion_tokens == 18


def test_n_choices_are_samples_of_one_engine_request_sharing_the_prompt_blocks(
    server: BackgroundServer, oai: openai.OpenAI
) -> None:
    """As GenerateRequest's n: choices 1.. start from the full blocks choice 0 computed (the
    hit counters say so, to the token), and usage reports OpenAI's cached_tokens."""
    engine = server.server.engine
    prompt = list(range(300, 340))  # 40 tokens: 2 full KV blocks of 16 (seen by no other test)
    kw: dict[str, Any] = {"max_tokens": 4, "n": 3, "seed": 3, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    wait_idle(engine)
    before = engine.stats().prefix_cache
    r = oai.completions.create(model="qv-r4", prompt=prompt, **kw)
    after = engine.stats().prefix_cache
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (40, 12)
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 0
    assert after.queried_tokens - before.queried_tokens == 3 * 40
    assert after.hit_tokens - before.hit_tokens == 2 * 32  # the prompt's blocks computed once, by choice 0

    # The same body again, streamed: choice 0 finds the prompt cached too; the same draws.
    events = list(oai.completions.create(model="qv-r4", prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
    texts = {i: "".join(c.choices[0].text for c in events if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.text for c in r.choices]
    usage = events[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (40, 12, 32)

    # Two prompts x n = 2: each prompt's samples share its own blocks; choice p * n + i.
    two = oai.completions.create(model="qv-r4", prompt=[prompt, prompt[:20]], **{**kw, "n": 2})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == [c.text for c in r.choices[:2]]
    assert two.usage.prompt_tokens == 60 and two.usage.prompt_tokens_details is not None
    assert two.usage.prompt_tokens_details.cached_tokens == 32 + 16
    wait_idle(engine)
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("adapter", ["acme/chatty", "qv-r4", None])
def test_chat_greedy_tokens_and_logprobs_equal_peft(
    oai: openai.OpenAI, tokenizer: Any, llama_peft: Any, adapter: str | None
) -> None:
    """The prompt is the one apply_chat_template makes with the adapter's own template
    (acme/chatty), else the base's; logprobs are PEFT's log-softmax at each position."""
    template = OWN_TEMPLATE if adapter == "acme/chatty" else tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(MESSAGES, chat_template=template, add_generation_prompt=True, return_dict=False)
    name = PEFT_NAME[adapter]
    expected = llama_peft.greedy(prompt, name, 8)
    r = oai.chat.completions.create(model=adapter or BASE, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY)
    choice = r.choices[0]
    assert choice.token_ids == expected
    assert r.usage.prompt_tokens == len(prompt)
    for k, (token, lp) in enumerate(zip(expected, choice.logprobs.content, strict=True)):
        ref = torch.log_softmax(llama_peft.last_logits(prompt + expected[:k], name), -1)
        assert abs(lp.logprob - float(ref[token])) < 1e-4, k
        top = ref.topk(3)
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lp.top_logprobs[0].token == tokenizer.decode([int(top.indices[0])])
    if adapter == "acme/chatty":  # its template really is not the base's
        assert prompt != tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)


def test_grpc_logprobs_equal_http(oai: openai.OpenAI, grpc: Client, tokenizer: Any) -> None:
    r = oai.completions.create(model="acme/chatty", prompt=PROMPT, max_tokens=5, logprobs=4, **GREEDY)
    http = r.choices[0].logprobs
    result = grpc.generate(PROMPT, adapter_id="acme/chatty", max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=4)
    assert http.token_logprobs == [lp.logprob for lp in result.logprobs]
    assert [lp.token_id for lp in result.logprobs] == result.token_ids == r.choices[0].token_ids
    # The legacy completions shape keys alternatives by token text (two ids of one text collapse).
    assert http.tokens == [tokenizer.decode([t]) for t in result.token_ids]
    assert http.top_logprobs == [{tokenizer.decode([t]): v for t, v in lp.top} for lp in result.logprobs]
    streamed = [c for c in grpc.generate_stream(PROMPT, adapter_id="acme/chatty", max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=4)]
    assert [lp for c in streamed for lp in (c.logprobs or [])] == result.logprobs


def test_a_stream_cancelled_midway_frees_its_kv_blocks_and_adapter_slot(server: BackgroundServer, oai: openai.OpenAI) -> None:
    engine = server.server.engine
    wait_idle(engine)
    finished: list[Any] = []
    engine.on_finish = finished.append  # no metrics on this server: the hook is free
    try:
        stream = oai.completions.create(model="acme/chatty", prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks), next(chunks)
        assert engine.stats().kv_blocks_used > 0 and engine.adapter_info("acme/chatty").active_requests == 1
        stream.close()
        wait_idle(engine)
    finally:
        engine.on_finish = None
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert engine.adapter_info("acme/chatty").active_requests == 0  # its slot is free to evict
    assert len(finished) == 1 and finished[0].status is RequestStatus.FINISHED_ABORTED
    assert len(finished[0].output_token_ids) < 400


def test_unknown_model_is_not_found_never_the_base(oai: openai.OpenAI) -> None:
    for model in ("nope", "acme/nope", "not an id"):
        with pytest.raises(openai.NotFoundError) as e:
            oai.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert e.value.code == "model_not_found" and e.value.param == "model", model
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("completions", {"temperature": -1}, "temperature"),
        ("completions", {"max_tokens": 0}, "max_tokens"),
        ("completions", {"n": 17}, "n"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("completions", {"stop": ["x"] * 17}, "stop"),
        ("completions", {"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ],
)
def test_a_bad_field_is_a_bad_request_naming_it(oai: openai.OpenAI, route: str, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if route == "completions":
            oai.completions.create(**{"model": BASE, "prompt": PROMPT, "max_tokens": 2, **fields})
        else:
            oai.chat.completions.create(**{"model": BASE, "messages": MESSAGES, "max_tokens": 2, **fields})
    assert e.value.param == param, e.value.message


def test_wrong_or_missing_token_is_unauthenticated(server: BackgroundServer) -> None:
    with openai.OpenAI(base_url=_url(server, "/v1"), api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2)
    with pytest.raises(urllib.error.HTTPError) as e:  # no Authorization header at all
        urllib.request.urlopen(_url(server, "/v1/models"), timeout=30)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["type"] == "authentication_error"


def test_vllm_style_load_and_unload(server: BackgroundServer, oai: openai.OpenAI, grpc: Client, adapter_root: Path) -> None:
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "vllm-style", "lora_path": str(adapter_root / "spare")})
    assert (status, text) == (200, "Success: LoRA adapter 'vllm-style' added successfully.")
    assert any(m.id == "vllm-style" and m.parent == BASE for m in oai.models.list().data)
    http = _completion(oai, "vllm-style", False, max_tokens=6, **GREEDY)
    assert http == _as_grpc(grpc.generate(PROMPT, adapter_id="vllm-style", max_new_tokens=6, temperature=0.0, ignore_eos=True))
    status, text = _post(server, "/v1/unload_lora_adapter", {"lora_name": "vllm-style"})
    assert (status, text) == (200, "Success: LoRA adapter 'vllm-style' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="vllm-style", prompt=PROMPT, max_tokens=2)
    status, text = _post(server, "/v1/unload_lora_adapter", {"lora_name": "vllm-style"})
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "outside", "lora_path": "/etc"})
    assert status == 400, text


def test_tokenize_over_http_and_grpc(server: BackgroundServer, grpc: Client, tokenizer: Any) -> None:
    own = tokenizer.apply_chat_template(MESSAGES, chat_template=OWN_TEMPLATE, add_generation_prompt=True, return_dict=False)
    status, text = _post(server, "/tokenize", {"model": "acme/chatty", "messages": MESSAGES})
    assert status == 200 and json.loads(text) == {"count": len(own), "max_model_len": 512, "tokens": own, "token_strs": None}
    assert grpc.tokenize(messages=MESSAGES, adapter_id="acme/chatty").token_ids == own
    base = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert grpc.tokenize(messages=MESSAGES, adapter_id="qv-r4").token_ids == base  # no template of its own
    status, text = _post(server, "/tokenize", {"model": BASE, "prompt": PROMPT})
    assert json.loads(text)["tokens"] == tokenizer(PROMPT)["input_ids"] == grpc.tokenize(PROMPT).token_ids
    status, text = _post(server, "/tokenize", {"model": "nope", "prompt": PROMPT})
    assert status == 404


def test_async_client_tokenize_and_chat(server: BackgroundServer) -> None:
    async def run() -> tuple[Any, Any]:
        async with AsyncClient(f"127.0.0.1:{server.server.port}", token=SECRET, timeout=120) as client:
            tokens = await client.tokenize(messages=MESSAGES, adapter_id="acme/chatty")
            result = await client.generate(messages=MESSAGES, adapter_id="acme/chatty", max_new_tokens=3, logprobs=1)
            return tokens, result

    tokens, result = asyncio.run(run())
    assert tokens.count == result.usage.prompt_tokens == len(tokens.token_ids)
    assert len(result.logprobs) == 3 and all(len(lp.top) == 1 for lp in result.logprobs)

