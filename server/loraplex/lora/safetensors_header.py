"""The safetensors header of an adapter's weights, proved against its file without reading
tensor data: the 8-byte size, the JSON (no key twice), and every tensor's byte span, which
must have the length its dtype and shape need, with no gap or overlap, up to the file's last
byte. A file cut short or padded is refused here, at registration, not at its first use.
No torch here: the S3 source applies the same proof to the ranged bytes it fetched."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex.lora.adapter_errors import AdapterError

MAX_HEADER_BYTES = 100 << 20
# Bytes per element of every safetensors dtype, so that any header can be checked against its file.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def read_header(path: Path, where: str) -> dict[str, Any]:
    """The safetensors header (tensor names, dtypes, shapes), checked against the file's size
    without reading the tensor data (check_data_offsets)."""
    try:
        with path.open("rb") as fh:
            file_size = fh.seek(0, 2)
            fh.seek(0)
            size = header_size(where, fh.read(8))
            if 8 + size > file_size:
                raise AdapterError(
                    f"{where}: truncated: the header promises {size} bytes, the file holds {max(0, file_size - 8)} after the size"
                )
            header = parse_header(where, fh.read(size))
    except OSError as e:  # its text names the server's own path: never shown
        raise AdapterError(f"{where}: cannot read the safetensors header: {e.strerror}") from None
    check_data_offsets(where, header, file_size - 8 - size)
    return header


def header_size(where: str, first8: bytes) -> int:
    """The header length a safetensors file's first 8 bytes give (little-endian u64)."""
    size = int.from_bytes(first8, "little") if len(first8) == 8 else 0
    if not 0 < size <= MAX_HEADER_BYTES:
        raise AdapterError(f"{where}: not a safetensors file (header size {size})")
    return size


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def parse_header(where: str, raw: bytes) -> dict[str, Any]:
    """A safetensors header's JSON (the bytes after the 8-byte length), metadata dropped."""
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as e:
        raise AdapterError(f"{where}: the safetensors header lists {str(e)!r} twice") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{where}: cannot read the safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: malformed safetensors header")
    header.pop("__metadata__", None)
    return header


def check_data_offsets(where: str, header: Mapping[str, Any], data_size: int) -> None:
    """The file is whole: every tensor's [begin, end) in the data buffer (the `data_size` bytes
    after the header) has the length its dtype and shape need, with no gap or overlap, up to
    the buffer's last byte."""
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise AdapterError(f"{where}: {key}: malformed tensor entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise AdapterError(f"{where}: {key}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise AdapterError(f"{where}: {key}: malformed shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise AdapterError(f"{where}: {key}: malformed data_offsets {offsets!r}")
        need = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            raise AdapterError(
                f"{where}: {key}: {dtype} {shape} needs {need} bytes, the header gives it {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise AdapterError(f"{where}: {key}: tensor data at byte {begin}, expected {end} (a gap or an overlap)")
        end = stop
    if end > data_size:
        raise AdapterError(f"{where}: truncated: the header promises {end} bytes of tensor data, the file holds {data_size}")
    if end < data_size:
        raise AdapterError(f"{where}: {data_size - end} bytes after the last tensor (not a safetensors file)")
