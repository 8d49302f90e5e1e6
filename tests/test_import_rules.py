"""The layer rules that import-linter cannot see: modules said to be torch-free import without it.

Each module is imported in a fresh interpreter whose import system refuses `torch` (and
anything under it), so a torch import anywhere on the module's import chain fails the test.
The other rules (lora never imports engine or api, engine never imports api, model never
imports engine / api / lora, the client never imports the server, no import cycles) are
import-linter contracts in pyproject.toml, run by `make test` (lint-imports).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

TORCH_FREE = [
    "loraplex.rules",
    "loraplex.engine.scheduler",
    "loraplex.engine.fair_share",
    "loraplex.engine.block_manager",
    "loraplex.engine.prefix_cache",
    "loraplex.engine.samples",
    "loraplex.engine.request",
    "loraplex.engine.live_requests",
    "loraplex.engine.stats",
    "loraplex.lora.slots",
    "loraplex.lora.adapter_spec",
    "loraplex.lora.adapter_chat_template",
    "loraplex.lora.adapter_errors",
    "loraplex.lora.safetensors_header",
    "loraplex.lora.adapter_version",
    "loraplex.lora.adapter_loader",
    "loraplex.lora.adapter_store",
    "loraplex.lora.adapter_roots",
    "loraplex.lora.device_slots",
    "loraplex.lora.host_tier",
    "loraplex.lora.s3_source",
]

# The auth seam is shared by the gRPC and HTTP transports: it imports neither torch nor grpc.
TRANSPORT_FREE = ["loraplex.api.tenants", "loraplex.api.auth", "loraplex.api.quotas"]

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib, sys

    blocked = sys.argv[2:] or ["torch"]

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in blocked:
                raise ImportError(f"{top} is blocked: {name} imported by a module that must not need it")
            return None

    sys.meta_path.insert(0, BlockTorch())
    importlib.import_module(sys.argv[1])
    assert not any(m.split(".")[0] in blocked for m in sys.modules), "a blocked package got in"
    """
)


def _import_without_torch(module: str, *blocked: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, module, *blocked], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_with_torch_blocked(module: str) -> None:
    proc = _import_without_torch(module)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("module", TRANSPORT_FREE)
def test_the_auth_seam_imports_neither_torch_nor_grpc(module: str) -> None:
    proc = _import_without_torch(module, "torch", "grpc")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_block_catches_torch() -> None:
    """The blocker works: a module that needs torch fails to import."""
    proc = _import_without_torch("loraplex.lora.adapter_weights")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
