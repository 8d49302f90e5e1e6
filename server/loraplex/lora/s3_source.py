"""Adapters in S3-compatible storage: `s3://bucket/prefix` as a LoadAdapter path or an adapter
root (auto-register). No torch here; boto3 is imported on first use.

    registration (a worker thread)                   loader thread (S3Files.read)
    GET  prefix/adapter_config.json (<= 1 MiB)       cache hit: both files + the hash they had
    HEAD prefix/adapter_model.safetensors               when downloaded, re-hashed  → bytes
    GET  its header bytes (Range, If-Match)          miss: GET both objects If-Match the registered
    GET  chat_template.jinja, else tokenizer_config.json, if there (the adapter's own chat template)
    build_spec: the same checks as a directory          ETags (changed since → refused), size and
    content hash over the config bytes and the          MD5 (when the ETag is one) checked, written
      weights object's ETag and size                    to <cache root>/<bucket>/<prefix>/<hash>/

A registration reads only the config and the safetensors header: the weights are downloaded
when a request needs them, on the adapter store's loader thread, into a local cache under the
first local adapter root. The content hash of an s3:// adapter stands for the objects it was
registered from (their ETags change with every write), so the download is checked against
them: an object replaced since registration is refused, as a directory whose files changed.
Credentials, region and endpoint come from the usual AWS environment (AWS_ACCESS_KEY_ID,
AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL_S3, ...), as for any boto3 client.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.lora.adapter_chat_template import (
    CHAT_TEMPLATE_FILE,
    MAX_TEMPLATE_BYTES,
    MAX_TOKENIZER_CONFIG_BYTES,
    TOKENIZER_CONFIG_FILE,
    parse_chat_template,
)
from loraplex.lora.adapter_spec import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    AdapterError,
    AdapterSpec,
    BaseLayerInfo,
    build_spec,
    content_hash,
    parse_config,
)
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.lora.safetensors_header import check_data_offsets, header_size, parse_header
from loraplex.rules import S3_SCHEME, is_s3_uri, s3_uri_problem

log = logging.getLogger(__name__)

CACHE_DIR = ".s3-cache"  # under the first local adapter root
HASH_FILE = ".content-hash"  # in a cache entry: content_hash of the two files as downloaded
HEADER_PROBE = 1 << 16  # the first ranged read of a safetensors file: most headers fit
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412"}


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash; "" is the whole bucket)."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, relative: str) -> S3Location:
        return parse_s3_uri(f"{self.uri}/{relative}")

    def contains(self, other: S3Location) -> bool:
        return other.bucket == self.bucket and (
            not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")
        )


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket[/prefix]` → S3Location; AdapterError (a ValueError) naming what is wrong."""
    problem = s3_uri_problem(uri)
    if problem is not None:
        raise AdapterError(f"{uri!r} {problem}" if problem.startswith("is ") else f"{uri!r}: {problem}")
    bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
    return S3Location(bucket, prefix.strip("/"))


# -- the client ------------------------------------------------------------------------------

_client_lock = threading.Lock()
_client: Any = None


def s3_client() -> Any:
    """One boto3 S3 client per process (clients are thread-safe; creating one is not)."""
    global _client
    with _client_lock:
        if _client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:  # pragma: no cover - boto3 is in the server extra
                raise AdapterError("s3:// adapters need boto3 (pip install 'loraplex[server]')") from None
            _client = boto3.session.Session().client("s3", config=Config(retries={"mode": "standard"}))
        return _client


def reset_client() -> None:
    """Forget the client (tests change the AWS environment between servers)."""
    global _client
    with _client_lock:
        _client = None


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _call(what: str, fn: Any, **kwargs: Any) -> Any:
    """One S3 request; its failures as AdapterNotFoundError (missing) or AdapterError (the reason)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        code = _error_code(e)
        if code in _MISSING:
            raise AdapterNotFoundError(f"{what} does not exist") from None
        if code in _CHANGED:
            raise
        raise AdapterError(f"{what}: S3 refused the request ({code or 'error'}: {e})") from None
    except BotoCoreError as e:
        raise AdapterError(f"{what}: cannot reach S3: {e}") from None


def exists(location: S3Location) -> bool:
    """Whether an adapter config object sits at this prefix (auto-register's probe)."""
    try:
        _call(location.uri, s3_client().head_object, Bucket=location.bucket, Key=location.key(CONFIG_FILE))
    except AdapterNotFoundError:
        return False
    return True


def find(relative: str, roots: tuple[S3Location, ...]) -> S3Location | None:
    """The first root holding an adapter at `relative` (an id or a relative path), or None."""
    for root in roots:
        location = root.child(relative)
        if exists(location):
            return location
    return None


def locate(path: str | Path, roots: tuple[S3Location, ...], found_locally: Callable[[], bool]) -> S3Location | None:
    """Where in S3 a LoadAdapter path names an adapter, or None for a local directory: an
    s3:// URI under one of the roots, or a relative path not found under a local root."""
    if is_s3_uri(path):
        location = parse_s3_uri(str(path))
        if not any(root.contains(location) for root in roots):
            raise AdapterError(f"adapter path {str(path)!r} is outside the adapter roots")
        return location
    if not roots or Path(path).is_absolute() or found_locally():
        return None
    found = find(str(path), roots)
    if found is None:
        raise AdapterNotFoundError(f"adapter path {str(path)!r} does not exist under the adapter roots")
    return found


# -- registration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Object:
    key: str
    etag: str  # as S3 gives it, quotes included: the If-Match of every later read
    size: int
    md5: bool  # the ETag is the object's MD5 (one-part upload, not KMS- or customer-encrypted)


def _object(key: str, head: Mapping[str, Any]) -> S3Object:
    etag = str(head.get("ETag", ""))
    md5 = bool(re.fullmatch(r'"?[0-9a-f]{32}"?', etag)) and not head.get("SSECustomerAlgorithm") and (
        head.get("ServerSideEncryption") in (None, "AES256")
    )
    return S3Object(key, etag, int(head.get("ContentLength", 0)), md5)


def read_spec(location: S3Location, layers: Mapping[str, BaseLayerInfo], max_rank: int, cache_root: Path) -> AdapterSpec:
    """Check an s3:// adapter against the base from its config and safetensors header (the
    weights are not downloaded here). AdapterNotFoundError when a key is missing."""
    client, uri = s3_client(), location.uri
    config_key, weights_key = location.key(CONFIG_FILE), location.key(WEIGHTS_FILE)
    try:
        got = _call(f"{uri}/{CONFIG_FILE}", client.get_object, Bucket=location.bucket, Key=config_key)
        if int(got.get("ContentLength", 0)) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{uri}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        config_bytes = got["Body"].read()
    except AdapterNotFoundError:
        raise AdapterNotFoundError(f"no adapter at {uri}: {CONFIG_FILE} does not exist") from None
    config_object = _object(config_key, got)
    weights_object = _object(
        weights_key, _call(f"{uri}/{WEIGHTS_FILE}", client.head_object, Bucket=location.bucket, Key=weights_key)
    )
    header = _read_header(location, weights_object)
    identity = f"s3 {weights_object.etag} {weights_object.size}".encode()
    digest = content_hash([[config_bytes], [identity]])
    cache_dir = cache_root / location.bucket / location.prefix / digest
    files = S3Files(location, config_object, weights_object, cache_dir)
    template = _read_chat_template(location)
    return build_spec(
        cache_dir, uri, parse_config(uri, config_bytes), header, layers, max_rank, digest, files, chat_template=template
    )


def _read_chat_template(location: S3Location) -> str | None:
    """The adapter's own chat template under its prefix, as a directory's (adapter_spec.parse_chat_template)."""
    jinja = _get_optional(location, CHAT_TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
    config = None if jinja is not None else _get_optional(location, TOKENIZER_CONFIG_FILE, MAX_TOKENIZER_CONFIG_BYTES)
    return parse_chat_template(location.uri, jinja, config)


def _get_optional(location: S3Location, name: str, limit: int) -> bytes | None:
    """A small object under the prefix, or None when there is none."""
    uri = f"{location.uri}/{name}"
    try:
        got = _call(uri, s3_client().get_object, Bucket=location.bucket, Key=location.key(name))
    except AdapterNotFoundError:
        return None
    if int(got.get("ContentLength", 0)) > limit:
        raise AdapterError(f"{uri} is larger than {limit} bytes")
    return bytes(got["Body"].read())


def _read_header(location: S3Location, weights: S3Object) -> dict[str, Any]:
    where = f"{location.uri}/{WEIGHTS_FILE}"
    probe = _get_range(location, weights, 0, min(HEADER_PROBE, weights.size) - 1)
    size = header_size(where, probe[:8])
    if 8 + size > weights.size:
        raise AdapterError(f"{where}: not a safetensors file (header size {size})")
    raw = probe[8 : 8 + size]
    if len(raw) < size:
        raw += _get_range(location, weights, len(probe), 8 + size - 1)
    header = parse_header(where, raw)
    check_data_offsets(where, header, weights.size - 8 - size)  # the object holds every tensor it lists
    return header


def _get_range(location: S3Location, obj: S3Object, first: int, last: int) -> bytes:
    what = f"{location.uri}/{obj.key.rsplit('/', 1)[-1]}"
    got = _checked_get(what, location, obj, Range=f"bytes={first}-{last}")
    return bytes(got["Body"].read())


def _checked_get(what: str, location: S3Location, obj: S3Object, **kwargs: Any) -> Any:
    """GET an object as registered: S3 refuses (412) if it changed since."""
    from botocore.exceptions import ClientError

    try:
        return _call(what, s3_client().get_object, Bucket=location.bucket, Key=obj.key, IfMatch=obj.etag, **kwargs)
    except ClientError:  # only the precondition codes get here
        raise AdapterError(f"{what} changed in S3 since the adapter was registered; load it again") from None
    except AdapterNotFoundError:
        raise AdapterError(f"{what} is gone from S3 since the adapter was registered") from None


# -- the loader thread -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Files:
    """The registered objects of one s3:// adapter and its local cache entry (spec.remote)."""

    location: S3Location
    config: S3Object
    weights: S3Object
    cache_dir: Path

    @property
    def uri(self) -> str:
        return self.location.uri

    def read(self) -> tuple[bytes, bytes]:
        cached = self._read_cache()
        if cached is not None:
            return cached
        files = (self._download(self.config), self._download(self.weights))
        self._write_cache(files)
        return files

    def _download(self, obj: S3Object) -> bytes:
        what = f"{self.uri}/{obj.key.rsplit('/', 1)[-1]}"
        data = bytes(_checked_get(what, self.location, obj, ChecksumMode="ENABLED")["Body"].read())
        if len(data) != obj.size:
            raise AdapterError(f"{what}: downloaded {len(data)} bytes, the object has {obj.size}")
        if obj.md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != obj.etag.strip('"'):
            raise AdapterError(f"{what}: the downloaded bytes do not match the object's MD5 (ETag)")
        return data

    def _read_cache(self) -> tuple[bytes, bytes] | None:
        """The cached files if whole and unchanged since they were downloaded, else None."""
        try:
            recorded = (self.cache_dir / HASH_FILE).read_text().strip()
            files = ((self.cache_dir / CONFIG_FILE).read_bytes(), (self.cache_dir / WEIGHTS_FILE).read_bytes())
        except OSError:
            return None
        if content_hash([[files[0]], [files[1]]]) != recorded or len(files[1]) != self.weights.size:
            log.warning("adapter cache %s does not match what was downloaded: downloading again", self.cache_dir)
            return None
        return files

    def _write_cache(self, files: tuple[bytes, bytes]) -> None:
        """Write the entry next to its place, then rename: readers never see half of it."""
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache_dir.parent))
        try:
            (tmp / CONFIG_FILE).write_bytes(files[0])
            (tmp / WEIGHTS_FILE).write_bytes(files[1])
            (tmp / HASH_FILE).write_text(content_hash([[files[0]], [files[1]]]) + "\n")
            if self.cache_dir.exists():  # a stale or damaged entry
                shutil.rmtree(self.cache_dir, ignore_errors=True)
            os.replace(tmp, self.cache_dir)
        except OSError as e:  # another process may have written it first; the bytes in hand are checked
            log.warning("cannot write adapter cache %s: %s", self.cache_dir, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
