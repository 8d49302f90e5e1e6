"""Reading and validating PEFT LoRA directories, and their content hash. No torch here.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (never a pickle).
Anything that would make the served output differ from PEFT's is refused with the reason,
so an adapter is either applied exactly or not at all:

    DoRA, LoRA bias, modules_to_save, bias != "none", embedding / lm_head targets,
    target_parameters, trainable tokens, aLoRA, QA-LoRA, layer replication, fan_in_fan_out,
    rank above max_lora_rank, targets the base lacks, tensors whose shapes do not fit.

rsLoRA, rank_pattern and alpha_pattern are honoured with PEFT's exact scale
(alpha / r, or alpha / sqrt(r) with rsLoRA; patterns matched as PEFT's get_pattern_key).

    directory ──read_spec──> AdapterSpec (config + safetensors header checked against the base;
                             no tensor data read)       the registered tier
              ──load_weights (adapter_weights.py, torch)──> AdapterWeights   the host tier

`hash_adapter_files` is the one content hash: registration records it, loading checks the
bytes it reads against it (`read_adapter_files`), and uploads are stored under it. An adapter
from a remote source (s3_source.py) is checked by its `remote` files object instead: the
source's own identity (object ETags) stands in for the bytes it has not read yet.

An adapter trained with its own chat template brings it: `chat_template.jinja`, or
`chat_template` in its `tokenizer_config.json` (as transformers saves them), in its directory
or under its S3 prefix (adapter_chat_template.py). It is read with the spec, so it is fixed
per version; the engine applies it (else the base's) to chat messages.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraplex.lora.adapter_chat_template import read_chat_template
from loraplex.lora.adapter_errors import AdapterError, AdapterReadError
from loraplex.lora.safetensors_header import read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an adapter directory serves, in content-hash order
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20

# Config fields that change the forward pass in ways a plain grouped LoRA cannot reproduce,
# with the value that means "off".
_UNSUPPORTED_FIELDS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora) is not supported"),
    "lora_bias": (False, "LoRA bias (lora_bias) is not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D layers) is not supported"),
    "target_parameters": (None, "target_parameters (LoRA on parameters) is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
    "use_qalora": (False, "QA-LoRA (use_qalora) is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "use_bdlora": (False, "block-diagonal LoRA (use_bdlora) is not supported"),
    "arrow_config": (None, "Arrow routing (arrow_config) is not supported"),
}


@dataclass(frozen=True, slots=True)
class BaseLayerInfo:
    """A wrapped linear layer of the base model: its name and shape."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


class RemoteFiles(Protocol):
    """An adapter's files in a remote source (s3_source.S3Files); read on the loader thread."""

    @property
    def uri(self) -> str: ...

    def read(self) -> tuple[bytes, bytes]:
        """adapter_config.json and adapter_model.safetensors as registered, from the local cache
        or downloaded into it; AdapterError if they changed since registration."""
        ...


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """What the config says, checked; no tensors yet (the registered tier)."""

    path: Path  # resolved, absolute: where the files are read (a remote adapter's: its cache)
    rank: int  # the largest rank over all modules
    alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...] | str
    content_hash: str  # hash_adapter_files of the directory when it was checked
    module_ranks: Mapping[str, int]  # module name -> rank, for every targeted module
    remote: RemoteFiles | None = None  # where the files come from when not a local directory (path is then its cache)
    chat_template: str | None = None  # the adapter's own (Jinja), if it brings one
    # How messages and AdapterInfo name it: relative to its adapter root (callers never learn
    # the server's own paths), or its remote URI.
    display_path: str = ""

    @property
    def location(self) -> str:
        """Where the adapter was registered from, for the server's log: its directory, or its remote URI."""
        return self.remote.uri if self.remote is not None else str(self.path)

    def host_bytes(self, layers: Mapping[str, BaseLayerInfo], itemsize: int) -> int:
        """Bytes the validated tensors take in the host tier at the compute dtype."""
        return sum(r * (layers[m].in_features + layers[m].out_features) * itemsize for m, r in self.module_ranks.items())

    def scale_for(self, module_name: str, rank: int) -> float:
        """PEFT's scaling for one module (LoraLayer.update_layer)."""
        alpha_key = _pattern_key(self.alpha_pattern, module_name)
        alpha = float(self.alpha_pattern.get(alpha_key, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    # Same rule as peft.utils.other.get_pattern_key.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _read_config(path: Path, where: str) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{where}: missing {CONFIG_FILE}")
    try:
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{where}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        raw = config_path.read_bytes()
    except OSError as e:  # its text names the server's own path: never shown
        raise AdapterError(f"{where}: cannot read {CONFIG_FILE}: {e.strerror}") from None
    return parse_config(where, raw)


def parse_config(where: str, raw: bytes) -> dict[str, Any]:
    """adapter_config.json's bytes as a dict (a directory's file or a downloaded object)."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{where}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    return config


def content_hash(files: Iterable[Iterable[bytes]]) -> str:
    """The adapter content hash: sha256 over each file's bytes (in ADAPTER_FILES order), each
    followed by a NUL; 16 hex digits. A file comes as its bytes in one or more chunks."""
    h = hashlib.sha256()
    for chunks in files:
        for chunk in chunks:
            h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            yield chunk


def hash_adapter_files(directory: Path) -> str:
    """content_hash of an adapter directory's files, read from disk in 1 MiB chunks."""
    return content_hash(_chunks(Path(directory) / name) for name in ADAPTER_FILES)


def read_files(path: Path) -> tuple[bytes, bytes]:
    """A local adapter's config and weights bytes (the one disk read of a load)."""
    return (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()


def read_adapter_files(spec: AdapterSpec) -> tuple[bytes, bytes]:
    """The config and weights bytes of a registered adapter, checked against its registration
    (the loader thread's read): AdapterError if they changed since."""
    if spec.remote is not None:
        return spec.remote.read()
    path, where = spec.path, spec.display_path or str(spec.path)
    try:
        config_bytes, data = read_files(path)
    except OSError as e:
        raise AdapterReadError(f"{where}: cannot read the adapter files: {e.strerror or 'I/O error'}") from None
    if content_hash([[config_bytes], [data]]) != spec.content_hash:
        raise AdapterError(f"{where}: the files changed on disk since the adapter was registered; load it again")
    return config_bytes, data


def _hash(directory: Path, where: str) -> str:
    try:
        return hash_adapter_files(directory)
    except OSError as e:  # the files are not refused, just unreadable now
        raise AdapterReadError(f"{where}: cannot read the adapter files: {e.strerror or 'I/O error'}") from None


def read_spec(
    path: Path, layers: Mapping[str, BaseLayerInfo], max_rank: int, display_path: str | None = None
) -> AdapterSpec:
    """Check an adapter directory against the base: config and tensor shapes (no tensor data is read).

    display_path: how messages name the directory (the store gives it relative to its adapter
    root: a caller never learns the server's own paths); by default the path itself.
    """
    path = Path(path)
    where = display_path if display_path is not None else str(path)
    if not path.is_dir():
        raise AdapterError(f"{where}: not a directory")
    config = _read_config(path, where)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise AdapterError(
                f"{where}: only {WEIGHTS_FILE} is read, never pickle files ({', '.join(pickles)}); "
                "re-save the adapter with safe_serialization=True"
            )
        raise AdapterError(f"{where}: missing {WEIGHTS_FILE}")
    header = read_header(weights, where)
    return build_spec(
        path, where, config, header, layers, max_rank, _hash(path, where), chat_template=read_chat_template(path, where)
    )


def _config_dict(where: str, config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{where}: {key} must be a JSON object, got {value!r}")
    return value


def _config_number(where: str, config: Mapping[str, Any], key: str, default: float, within: str = "") -> float:
    """A finite number (not a bool) from the config; `within` names the enclosing field."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        name = f"{within}[{key!r}]" if within else key
        raise AdapterError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _config_int(where: str, config: Mapping[str, Any], key: str, default: int, within: str = "") -> int:
    value = _config_number(where, config, key, default, within)
    if value != int(value) or not 0 <= value <= 1 << 20:
        name = f"{within}[{key!r}]" if within else key
        raise AdapterError(f"{where}: {name} must be a whole number in [0, {1 << 20}], got {config.get(key, default)!r}")
    return int(value)


def build_spec(
    path: Path, where: str, config: Mapping[str, Any], header: dict[str, Any], layers: Mapping[str, BaseLayerInfo],
    max_rank: int, content_hash: str, remote: RemoteFiles | None = None, chat_template: str | None = None,
) -> AdapterSpec:
    """Check a parsed config and safetensors header against the base (a directory's or a remote
    source's); `where` names the adapter in messages and becomes its display_path."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type {peft_type} is not LoRA")
    for key, (off, message) in _UNSUPPORTED_FIELDS.items():
        value = config.get(key, off)
        if value not in (off, None, False, [], {}):
            raise AdapterError(f"{where}: {message}")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save ({config['modules_to_save']}) is not supported: "
            "it replaces whole base modules per adapter"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{where}: bias={bias!r} is not supported (only 'none')")

    rank = _config_int(where, config, "r", 8)
    alpha = _config_number(where, config, "lora_alpha", 8)
    rank_pattern = {k: _config_int(where, {k: v}, k, 0, "rank_pattern") for k, v in _config_dict(where, config, "rank_pattern").items()}
    alpha_pattern = {
        k: _config_number(where, {k: v}, k, 0, "alpha_pattern") for k, v in _config_dict(where, config, "alpha_pattern").items()
    }
    if min([rank, *rank_pattern.values()]) < 1:
        raise AdapterError(f"{where}: rank must be >= 1")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {config['use_rslora']!r}")

    targets = config.get("target_modules") or ()
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{where}: target_modules must be a string or a list of strings, got {targets!r}")
    target_modules: tuple[str, ...] | str = targets if isinstance(targets, str) else tuple(targets)
    for name in (target_modules,) if isinstance(target_modules, str) else target_modules:
        if name in ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings"):
            raise AdapterError(f"{where}: target module {name!r} (embedding / lm_head) is not supported")

    _check_target_names(where, target_modules, layers)
    module_ranks = _check_tensors(where, header, config, rank_pattern, layers)
    if max(module_ranks.values()) > max_rank:
        raise AdapterError(f"{where}: rank {max(module_ranks.values())} is above max_lora_rank {max_rank}")
    return AdapterSpec(
        path=path,
        rank=max(module_ranks.values()),
        alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        content_hash=content_hash,
        module_ranks=module_ranks,
        remote=remote,
        chat_template=chat_template,
        display_path=where,
    )


# The tensor names PEFT saves: <module>.lora_A.weight, <module>.lora_B.weight (an adapter name may sit between).
LORA_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _check_tensors(
    where: str, header: Mapping[str, Any], config: Mapping[str, Any], rank_pattern: Mapping[str, int],
    layers: Mapping[str, BaseLayerInfo],
) -> dict[str, int]:
    """Check every tensor against the base's layers; return module name -> rank."""
    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, info in header.items():
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{where}: DoRA weights ({key}) are not supported")
        if "lora_embedding_" in key:
            raise AdapterError(f"{where}: embedding LoRA ({key}) is not supported")
        match = LORA_KEY_RE.match(key)
        if match is None:
            raise AdapterError(f"{where}: unexpected tensor {key!r} (only lora_A / lora_B weights are served)")
        module, kind = match["module"], match["kind"]
        if module.split(".")[-1] in ("lm_head", "embed_tokens"):
            raise AdapterError(f"{where}: target {module!r} (embedding / lm_head) is not supported")
        if not isinstance(info, dict) or info.get("dtype") not in _FLOAT_DTYPES:
            raise AdapterError(f"{where}: {key}: LoRA weights must be F32, F16 or BF16")
        pairs.setdefault(module, {})[kind] = (info["dtype"], list(info.get("shape", [])))
    if not pairs:
        raise AdapterError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")

    ranks: dict[str, int] = {}
    default_r = _config_int(where, config, "r", 8)
    for module, pair in sorted(pairs.items()):
        layer = layers.get(module)
        if layer is None:
            raise AdapterError(f"{where}: targets {module!r}, which the base model does not have as a linear layer")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{where}: {module} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"][1], pair["lora_B"][1]
        r = rank_pattern.get(_pattern_key(rank_pattern, module), default_r)
        if a != [r, layer.in_features] or b != [layer.out_features, r]:
            raise AdapterError(
                f"{where}: {module}: shapes lora_A {a}, lora_B {b} do not fit the base layer "
                f"[out={layer.out_features}, in={layer.in_features}] at rank {r}"
            )
        ranks[module] = r
    return ranks


def _check_target_names(where: str, targets: tuple[str, ...] | str, layers: Mapping[str, BaseLayerInfo]) -> None:
    """Every named target must exist in the base (PEFT matches on the last name parts)."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        try:
            matched = any(re.fullmatch(targets, name) for name in layers)
        except re.error as e:
            raise AdapterError(f"{where}: target_modules pattern {targets!r} is not a valid regular expression: {e}") from None
        if not matched:
            raise AdapterError(f"{where}: target_modules pattern {targets!r} matches no linear layer of the base")
        return
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in layers):
            raise AdapterError(f"{where}: target module {target!r} is not a linear layer of the base model")
