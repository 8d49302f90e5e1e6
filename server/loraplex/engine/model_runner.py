"""The model runner: packs one step's tokens into a flat batch and runs the model once.

    scheduled (request, n tokens) ──sort by adapter slot──> input_ids [1, T], position_ids [1, T]
                                                           StepContext (step_context.py):
                                                             KV write rows [T]
                                                             prefill spans, decode KV rows
                                                             LoRA batch (one segment per adapter slot)
    model(...) ──> logits of the last token of every request that finished its prompt / decoded

The context is built once here and read by attention (the `loraplex_step` forward keyword)
and by the LoRA layers (its `lora` part, through LoraModel.begin_step). Requests are ordered
by adapter slot so each adapter's tokens form one contiguous segment for the grouped LoRA
op; the order inside a step changes no result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.kv_cache import KVCache
from loraplex.engine.request import Request
from loraplex.engine.scheduler import ScheduledBatch
from loraplex.engine.step_context import PrefillSpan, StepContext
from loraplex.lora.lora_layer import LoraModel
from loraplex.model.loader import LoadedModel


@dataclass(slots=True)
class StepResult:
    logits: torch.Tensor  # [S, vocab] for the requests that sample
    sampling: list[Request]  # in the order of the logits rows
    num_tokens: int
    num_adapters: int


def _adapter_slot(request: Request) -> int:
    adapter = request.adapter
    return -1 if adapter is None else adapter.slot


class ModelRunner:
    def __init__(self, loaded: LoadedModel, lora: LoraModel, kv_cache: KVCache) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.lora = lora
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    def _kv_rows(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """Flat cache rows of positions [0, length) of each sequence: [len(tables) * length].

        Positions past a sequence's blocks point at row 0; the attention mask hides them.
        """
        bs = self.block_size
        nb = -(-length // bs)
        padded = torch.tensor([t[:nb] + [0] * (nb - len(t)) for t in tables], dtype=torch.long)  # [S, nb]
        rows = (padded[:, :, None] * bs + torch.arange(bs)).view(len(tables), nb * bs)[:, :length]
        return rows.reshape(-1).to(self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        order = sorted(range(len(batch)), key=lambda i: _adapter_slot(batch.requests[i]))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        kv_write_rows: list[int] = []
        prefills: list[PrefillSpan] = []
        decode_index: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        token_runs: list[tuple[int, int]] = []
        logits_index: list[int] = []
        sampling: list[Request] = []

        for i in order:
            request, n = batch.requests[i], batch.num_new_tokens[i]
            start, computed = len(input_ids), request.num_computed_tokens
            table = request.block_table
            all_ids = request.all_token_ids
            input_ids.extend(all_ids[computed : computed + n])
            positions.extend(range(computed, computed + n))
            kv_write_rows.extend(table[p // bs] * bs + p % bs for p in range(computed, computed + n))
            if n == 1:
                decode_index.append(start)
                decode_tables.append(table)
                decode_lens.append(computed + 1)
            else:
                rows = None if computed == 0 else self._kv_rows([table], computed + n)
                prefills.append(PrefillSpan(start, n, computed + n, rows))
            token_runs.append((_adapter_slot(request), n))
            if computed + n == request.num_tokens:
                logits_index.append(start + n - 1)
                sampling.append(request)

        dev = self.device
        num_tokens = len(input_ids)
        context = StepContext(
            kv_cache=self.kv_cache,
            kv_write_rows=torch.tensor(kv_write_rows, dtype=torch.long, device=dev),
            prefills=prefills,
            decode_index=None,
            decode_kv_rows=None,
            decode_context_lens=None,
            lora=self.lora.backend.prepare(token_runs, self.lora.slot_ranks, self.lora.max_rank, num_tokens),
        )
        if decode_index:
            context.decode_index = torch.tensor(decode_index, dtype=torch.long, device=dev)
            context.decode_kv_rows = self._kv_rows(decode_tables, max(decode_lens))
            context.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)

        self.lora.begin_step(context.lora)
        try:
            out = self.model(
                input_ids=torch.tensor([input_ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
                past_key_values=None,  # no transformers cache: attention writes the KV rows itself
                use_cache=False,
                logits_to_keep=torch.tensor(logits_index, dtype=torch.long, device=dev),
                loraplex_step=context,
            )
        finally:
            self.lora.end_step()
        return StepResult(
            logits=out.logits[0],
            sampling=sampling,
            num_tokens=num_tokens,
            num_adapters=len({s.slot for s in context.lora.segments}),
        )
