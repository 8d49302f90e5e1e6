"""Storing an UploadAdapter stream: a private temporary directory, then a content-addressed home.

    UploadAdapter ── Upload(root) ── write(name, data) ... ── commit(home) ──> register
                        │ .uploads/upload-XXXX/          <ns>/.uploads/<name>/<content hash>/
                        └── close(): the temporary directory goes, whatever happened

Nothing partial stays on disk: a stream that fails (bad message, over the cap, the client
gone, ENOSPC) leaves no file, and a home made by `commit` is removed again by `discard`
when the registration that follows refuses the files. A full disk (ENOSPC, EDQUOT) is
RESOURCE_EXHAUSTED; any other write error is UNAVAILABLE: the caller may retry, the
server is not broken.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import grpc

from loraplex.api.errors import ApiError
from loraplex.lora.adapter_spec import hash_adapter_files

UPLOAD_DIR = ".uploads"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def storage_error(error: OSError, what: str) -> ApiError:
    """The status for a disk error while storing an upload."""
    reason = error.strerror or str(error)
    if error.errno in _FULL:
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot store the upload ({what}): {reason}; nothing was kept")
    return ApiError(grpc.StatusCode.UNAVAILABLE, f"cannot store the upload ({what}): {reason}; nothing was kept")


class Upload:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploads = root / UPLOAD_DIR
        try:
            self.uploads.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads))
        except OSError as e:
            raise storage_error(e, "creating its directory") from None
        self._files: dict[str, BinaryIO] = {}
        self._home: Path | None = None  # a home this upload created (removed by discard)

    @property
    def names(self) -> set[str]:
        return set(self._files)

    def write(self, name: str, data: bytes) -> None:
        """Append a chunk to one of the upload's files (name already checked by the caller)."""
        try:
            if name not in self._files:
                self._files[name] = (self.tmp / name).open("wb")
            self._write(self._files[name], data)
        except OSError as e:
            raise storage_error(e, f"writing {name}") from None

    @staticmethod
    def _write(fh: BinaryIO, data: bytes) -> None:
        fh.write(data)

    def _close_files(self) -> None:
        files, self._files = list(self._files.values()), {}
        error: OSError | None = None
        for fh in files:
            try:
                fh.close()  # flushes: a full disk may show up only here
            except OSError as e:
                error = error or e
        if error is not None:
            raise storage_error(error, "closing its files")

    def commit(self, home: str) -> Path:
        """Close the files and move them to their content-addressed home under `home` (relative
        to the root: access.upload_home, inside the id's own namespace); returns the home
        relative to the root. An id uploaded again with the same content reuses the home."""
        self._close_files()
        digest = hash_adapter_files(self.tmp)
        final = self.root / home / digest
        if not final.exists():
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self.tmp.rename(final)
            except OSError as e:
                raise storage_error(e, "moving it into place") from None
            self._home = final
        return final.relative_to(self.root)

    def discard(self) -> None:
        """The registration refused the files: remove the home this upload made."""
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def close(self) -> None:
        for fh in self._files.values():
            if not fh.closed:
                fh.close()
        self._files = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
