"""LoRA layers wrapped once around every targetable linear layer, and the device slot pool.

    x ──> base (Linear4bit NF4 | nn.Linear) ─────────────────────────────┐
     │                                                                    + ──> y
     └──> backend.shrink(x, A[slots]) ──v──> backend.expand(v, Bᵀ[slots]) ┘

Each wrapped layer owns its slice of the slot pool: A [max_loras, max_lora_rank, d_in] and
Bᵀ [max_loras, max_lora_rank, d_out]. Putting an adapter on the device is one copy per layer
into a slot; a layer the adapter does not target keeps zeros in that slot. The model's
structure never changes after start-up.

Every layer holds the model's one LoraContext: the LoRA backend chosen when the model is
wrapped (backends.py) and the step's LoraBatch (set by the model runner). Projections that
read the same input (q/k/v, gate/up) form a ProjectionGroup: the first of them to run asks
the backend for the shrink of all of them at once, and each then runs only its own expand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from loraplex.lora.adapter_spec import BaseLayerInfo
from loraplex.lora.adapter_weights import AdapterWeights
from loraplex.lora.backends import select_lora_backend
from loraplex.lora.lora_backend import EMPTY_BATCH, LoraBackend, LoraBatch, SlotViews, targets_mask

# The projections of Llama / Mistral / Qwen2-style blocks; other linear layers inside the
# decoder blocks are wrapped too (PEFT's "all-linear" also takes every linear but lm_head).
EXCLUDED = ("lm_head",)
# Siblings that transformers' Llama / Mistral / Qwen2 code calls with one input tensor.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraContext:
    """What every LoRA layer reads: the backend (fixed) and the step's batch (the LoRA part of
    the engine's per-step context).

    One per LoraModel, handed to each layer when it is wrapped (lora/ never imports the
    engine); the model runner sets the step's batch with `LoraModel.begin_step` and clears it
    with `end_step` once the forward pass is over.
    """

    __slots__ = ("backend", "batch")

    def __init__(self, backend: LoraBackend[Any]) -> None:
        self.backend = backend
        self.batch: LoraBatch = EMPTY_BATCH


class LoraLinear(nn.Module):
    def __init__(
        self, base: nn.Module, in_features: int, out_features: int, context: LoraContext,
        max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.context = context
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_loras, max_rank, out_features, dtype=dtype, device=device))
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.views: SlotViews = [None] * max_loras
        self.targets = 0  # bit s set: the adapter in slot s targets this layer (views[s] is not None)
        self.group: ProjectionGroup | None = None
        self.group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        context = self.context
        batch = context.batch
        if batch.segments:
            # x: [1, T, d_in] packed tokens; y: [1, T, d_out]
            if self.group is not None:
                v = self.group.shrunk(self, x, batch)
            else:
                v = context.backend.shrink(x.view(-1, self.in_features), self, batch)
            if v is not None:  # some adapter of the step targets this layer
                context.backend.expand(y.view(-1, self.out_features), v, self, batch)
        return y


class ProjectionGroup:
    """LoRA layers fed the same input tensor: one shrink serves them all.

    Their A pools live in one tensor [slots, P, r, d_in] (each layer's `lora_a` is a view), so
    the backend can shrink all P projections at once (`shrink_multi`: one matmul on the CPU,
    one Triton launch on CUDA). The first sibling to run asks for it and caches one result per
    sibling until the step ends.
    """

    __slots__ = ("_input", "_v", "layers", "pool")

    def __init__(self, layers: list[LoraLinear]) -> None:
        self.layers = layers
        first = layers[0].lora_a  # [slots, r, d_in]
        self.pool = torch.zeros(first.shape[0], len(layers), *first.shape[1:], dtype=first.dtype, device=first.device)
        for i, layer in enumerate(layers):
            layer.lora_a = self.pool[:, i]  # re-point the buffer at its slice of the pool
            layer.group, layer.group_index = self, i
        self._input: torch.Tensor | None = None  # the input the cached shrink was computed for
        self._v: list[Any] = []

    def shrunk(self, layer: LoraLinear, x: torch.Tensor, batch: LoraBatch) -> Any:
        """This sibling's shrink result (None: no adapter of the step targets it). x: [1, T, d_in]."""
        if self._input is not x:  # the first sibling to run this step
            self._input = x
            self._v = layer.context.backend.shrink_multi(x.view(-1, layer.in_features), self.pool, self.layers, batch)
        return self._v[layer.group_index]

    def reset(self) -> None:
        self._input = None
        self._v = []


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a bitsandbytes Linear4bit, else None."""
    if isinstance(module, nn.Linear):  # bnb's Linear4bit subclasses nn.Linear
        return module.in_features, module.out_features
    return None


class LoraModel:
    """Wraps the base model's linear layers and writes adapters into device slots."""

    def __init__(
        self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
        backend: LoraBackend[Any] | None = None,
    ) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.context = LoraContext(backend or select_lora_backend(device, dtype))
        self.layers: dict[str, LoraLinear] = {}
        self.slot_ranks = [0] * max_loras  # largest rank of the adapter in each slot
        targets = [
            (name, module, shape)
            for name, module in model.named_modules()
            if (shape := _linear_shape(module)) is not None and name.split(".")[-1] not in EXCLUDED
        ]
        for name, module, (d_in, d_out) in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = LoraLinear(module, d_in, d_out, self.context, max_loras, max_rank, dtype, device)
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError("the base model has no linear layers to put LoRA on")
        self.groups = self._find_groups()

    def _find_groups(self) -> list[ProjectionGroup]:
        groups = []
        for names in SHARED_INPUT:
            for name in self.layers:
                prefix, _, child = name.rpartition(".")
                if child != names[0]:
                    continue
                members = [self.layers.get(f"{prefix}.{n}") for n in names]
                found = [m for m in members if m is not None]
                if len(found) == len(names) and len({m.in_features for m in found}) == 1:
                    groups.append(ProjectionGroup(found))
        return groups

    @property
    def backend(self) -> LoraBackend[Any]:
        return self.context.backend

    def begin_step(self, batch: LoraBatch) -> None:
        """The step's LoRA batch (the `lora` part of the engine's StepContext) for every layer."""
        self.context.batch = batch

    def end_step(self) -> None:
        """Drop the step's batch and cached shrinks (and the inputs they hold)."""
        self.context.batch = EMPTY_BATCH
        for group in self.groups:
            group.reset()

    @property
    def layer_infos(self) -> dict[str, BaseLayerInfo]:
        return {name: BaseLayerInfo(name, layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into a device slot: one copy per layer, zeros where it has no weights."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                module = weights.modules.get(name)
                if module is None:
                    layer.lora_a[slot].zero_()
                    layer.lora_b[slot].zero_()
                    continue
                r = module.a.shape[0]
                layer.lora_a[slot, :r].copy_(module.a, non_blocking=True)
                layer.lora_a[slot, r:].zero_()
                layer.lora_b[slot, :r].copy_(module.b, non_blocking=True)
                layer.lora_b[slot, r:].zero_()
        self.slot_ranks[slot] = weights.rank
        for name, layer in self.layers.items():
            module = weights.modules.get(name)
            # Views over this layer's own rank; None where the adapter does not target the layer.
            layer.views[slot] = None if module is None else (layer.lora_a[slot, : module.a.shape[0]].t(), layer.lora_b[slot, : module.a.shape[0]])
            layer.targets = targets_mask(layer.views)

    def swap_slots(self, a: int, b: int) -> None:
        """Exchange the adapters in slots a and b (either may be empty): rows up to the larger of
        their ranks in every layer (rows past a slot's rank are zeros in both)."""
        rows = max(self.slot_ranks[a], self.slot_ranks[b])
        with torch.no_grad():
            for layer in self.layers.values():
                for pool in (layer.lora_a, layer.lora_b):
                    held = pool[a, :rows].clone()
                    pool[a, :rows].copy_(pool[b, :rows])
                    pool[b, :rows].copy_(held)
                ranks = [None if v is None else v[1].shape[0] for v in layer.views]
                ranks[a], ranks[b] = ranks[b], ranks[a]
                for s in (a, b):
                    r = ranks[s]
                    layer.views[s] = None if r is None else (layer.lora_a[s, :r].t(), layer.lora_b[s, :r])
                layer.targets = targets_mask(layer.views)
        self.slot_ranks[a], self.slot_ranks[b] = self.slot_ranks[b], self.slot_ranks[a]

    def __iter__(self) -> Iterator[LoraLinear]:
        return iter(self.layers.values())

    @property
    def pool_bytes(self) -> int:
        return sum(layer.lora_a.nbytes + layer.lora_b.nbytes for layer in self.layers.values())
