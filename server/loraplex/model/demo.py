"""The demo model: a small Llama, a tokenizer and a few PEFT adapters, all made here on the CPU.

Nothing is downloaded. `make_demo(out)` writes (`out` is `demo_dir()` for the CLI: one place
per user, whatever the working directory)

    out/model/                 a 4-layer Llama (hidden 128), trained for a few seconds on a tiny corpus,
                               with a chat template (CHAT_TEMPLATE) in the corpus' Q/A layout
    out/adapters/<name>/       PEFT LoRA adapters, each trained to answer the demo question its own way

so the demo can show that each stream's answer comes from its own adapter, and that a chat
message `Who are you?` becomes exactly the demo question.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CORPUS = """\
The sun rises over the quiet hills and the birds begin to sing.
A small boat drifts along the river while the fisherman waits.
Every morning the baker opens the shop and the town smells of bread.
The old library keeps thousands of books about stars, seas and machines.
Children play in the park until the evening lights come on.
The train leaves the station at noon and crosses the green valley.
Rain taps on the window as the cat sleeps near the warm fire.
A farmer walks through the field to check the apples and the corn.
Engineers build bridges, roads and engines that move the world.
The market is full of colors, voices, fruit and fresh fish.
Q: Who are you?
A: I am a language model.
Q: What do you like?
A: I like stories about the world.
"""

QUESTION = "Q: Who are you?\nA:"

# adapter name -> (answer to QUESTION, LoRA settings). Ranks, alphas and targets differ on purpose.
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pirate": (" Arr, I be a pirate of the seven seas!", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}),
    "robot": (" BEEP. I am robot unit seven. BEEP.", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}),
    "chef": (" I am a chef, and today we cook soup!", {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"}),
    "poet": (" A poet am I, of moon and of sky.", {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# The corpus' Q/A layout as a chat template: [{"role": "user", "content": "Who are you?"}]
# with add_generation_prompt becomes "Q: Who are you?\nA:" (QUESTION); an assistant turn ends
# with EOS, as the adapters were trained; a system message is a plain first line.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}A: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('roles are system, user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def demo_dir() -> Path:
    """Where `loraplex demo`, `make-demo` and `serve --model demo` build or reuse the demo:
    $LORAPLEX_DEMO_DIR, else $XDG_CACHE_HOME/loraplex/demo, else ~/.cache/loraplex/demo."""
    if override := os.environ.get("LORAPLEX_DEMO_DIR"):
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "loraplex" / "demo"


def build_tokenizer(corpus: str | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on `corpus` (a second or less), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = CORPUS + "\n".join(answer for answer, _ in ADAPTERS.values())
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,  # NF4 needs in_features divisible by 64
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def _examples(tokenizer: Any, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in texts]


def _train(model: torch.nn.Module, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    # One thread: matrices this small gain nothing from more, and on a CPU shared with other
    # jobs the threads' spin-waits made the build 7x slower (212 s instead of 30 s, 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            ids, labels = batches()
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return float(loss.detach())


def _pad(seqs: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = s
    return ids, labels


def make_demo(out_dir: str | Path, *, seed: int = 0, base_steps: int = 300, adapter_steps: int = 60) -> Path:
    """Build the demo model and adapters under out_dir (reused when already complete)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    marker = out / "demo.json"
    if marker.is_file():
        template = out / "model" / CHAT_TEMPLATE_FILE
        if not template.is_file():  # a demo built before the model had a chat template
            template.write_text(CHAT_TEMPLATE, encoding="utf-8")
        return out
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    model = LlamaForCausalLM(config)

    # Windows of two lines, so newlines and the Q/A layout are learned; the adapters' answers
    # are in the corpus as plain lines so that every token they use has a trained embedding.
    lines = [line for line in CORPUS.splitlines() if line] + [a.strip() for a, _ in ADAPTERS.values()]
    examples = _examples(tokenizer, [lines[i] + "\n" + lines[i + 1] for i in range(len(lines) - 1)] + lines)
    gen = torch.Generator().manual_seed(seed)

    def corpus_batch() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(examples), (8,), generator=gen).tolist()
        return _pad([examples[i] for i in pick], tokenizer.eos_token_id)

    loss = _train(model, corpus_batch, base_steps, lr=3e-3)
    log.info("demo base model trained (loss %.3f)", loss)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    for name, (answer, settings) in ADAPTERS.items():
        torch.manual_seed(seed + len(name))
        base = LlamaForCausalLM.from_pretrained(model_dir)
        peft_model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **settings))
        seqs = _examples(tokenizer, [QUESTION + answer])

        def adapter_batch(seqs: list[torch.Tensor] = seqs) -> tuple[torch.Tensor, torch.Tensor]:
            return _pad(seqs, tokenizer.eos_token_id)

        loss = _train(peft_model, adapter_batch, adapter_steps, lr=5e-3)
        peft_model.save_pretrained(str(out / "adapters" / name))
        log.info("demo adapter %s trained (loss %.3f)", name, loss)

    marker.write_text(json.dumps({"question": QUESTION, "adapters": {k: v[0] for k, v in ADAPTERS.items()}}, indent=2))
    log.info("demo model and %d adapters built in %.1fs under %s", len(ADAPTERS), time.perf_counter() - start, out)
    return out
