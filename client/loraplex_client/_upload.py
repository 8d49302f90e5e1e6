"""The request stream of UploadAdapter: a header, then the two files of a PEFT LoRA directory.

Only adapter_config.json and adapter_model.safetensors are ever read: a pickle checkpoint
(adapter_model.bin) can run code when loaded, so it is refused here before any byte is
sent rather than left for the server to refuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from loraplex_client.errors import InvalidRequestError
from loraplex_proto.v1 import loraplex_pb2 as pb

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # the order they are sent


def _invalid(argument: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{argument}: {problem}")


def adapter_files(local_dir: str | Path) -> list[Path]:
    """The files to send, checked before the call starts.

    A directory that does not exist or lacks a file raises InvalidRequestError naming
    `local_dir`, the path and what is missing.
    """
    root = Path(local_dir)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise _invalid("local_dir", f"adapter directory {str(root)!r} {what}")
    missing = [name for name in ADAPTER_FILES if not (root / name).is_file()]
    if missing:
        hint = ""
        if "adapter_model.safetensors" in missing and (root / "adapter_model.bin").exists():
            hint = (
                "; adapter_model.bin (pickle) is never uploaded: save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise _invalid("local_dir", f"{str(root)!r} is not a PEFT LoRA directory: missing {', '.join(missing)}{hint}")
    return [root / name for name in ADAPTER_FILES]


def upload_requests(
    adapter_id: str, files: list[Path], pin: bool, chunk_size: int
) -> Iterator[pb.UploadAdapterRequest]:
    """Yield the header, then each file in chunks of at most chunk_size bytes.

    A generator, so grpc reads one chunk at a time while it sends: an adapter of any size
    never sits in memory whole.
    """
    yield pb.UploadAdapterRequest(header=pb.UploadAdapterHeader(adapter_id=adapter_id, pin=pin))
    for path in files:
        with path.open("rb") as f:
            while data := f.read(chunk_size):
                yield pb.UploadAdapterRequest(chunk=pb.UploadAdapterChunk(filename=path.name, data=data))


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise _invalid("chunk_size", f"must be positive, got {chunk_size}")
