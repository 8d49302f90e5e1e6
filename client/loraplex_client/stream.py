"""What generate_stream returns: the chunks of one GenerateStream call, sync and asyncio.

Stopping early cancels the call, and the server aborts the request within one engine step,
so no step is spent on tokens nobody reads. Early means: breaking out of a `for` / `async for`
loop over the stream, close(), leaving a `with` / `async with` block, or dropping the
stream (grpc cancels a call it garbage-collects). Errors, including ones the server sends
after some chunks, are raised as LoraplexError subclasses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import grpc

from loraplex_client import _convert
from loraplex_client.errors import error_from_rpc
from loraplex_client.types import GenerateChunk


class GenerateStream:
    """Iterate it once: `for chunk in stream`. The last chunk has finish_reason and usage."""

    def __init__(self, call: Any) -> None:
        self._call = call  # a grpc unary-stream call: an iterator of messages and a grpc.Future
        self._closed = False

    def __iter__(self) -> Iterator[GenerateChunk]:
        # A generator, not `return self`: the loop owns it, so leaving the loop (break, an
        # exception in the body) finalizes it and the `finally` cancels the call, even while
        # the caller still holds the stream itself.
        try:
            while (chunk := self._read()) is not None:
                yield chunk
        finally:
            self.close()

    def __next__(self) -> GenerateChunk:
        chunk = self._read()
        if chunk is None:
            raise StopIteration
        return chunk

    def _read(self) -> GenerateChunk | None:
        if self._closed:
            return None
        try:
            message = next(self._call)
        except StopIteration:
            self._closed = True
            return None
        except grpc.RpcError as e:
            if self._closed:  # close() from another thread: the owner ended it, not a failure
                return None
            self._closed = True
            raise error_from_rpc(e) from e
        return _convert.generate_chunk(message)

    def close(self) -> None:
        """Cancel the call if it is still running (the server aborts the request)."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncGenerateStream:
    """Iterate it once: `async for chunk in stream`. The last chunk has finish_reason and usage."""

    def __init__(self, call: Any) -> None:
        self._call = call  # a grpc.aio.UnaryStreamCall
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        # An async generator for the same reason as GenerateStream.__iter__; asyncio finalizes
        # one left by `break` on its next loop iteration, which cancels the call.
        try:
            while (chunk := await self._read()) is not None:
                yield chunk
        finally:
            self.close()

    async def __anext__(self) -> GenerateChunk:
        chunk = await self._read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _read(self) -> GenerateChunk | None:
        if self._closed:
            return None
        try:
            message = await self._call.read()
        except asyncio.CancelledError:
            # grpc.aio raises this from a read of a call cancelled locally: after close() it is
            # the end of the stream; otherwise it is this task being cancelled.
            if self._closed:
                return None
            raise
        except grpc.RpcError as e:
            self._closed = True
            raise error_from_rpc(e) from e
        if message is grpc.aio.EOF:
            self._closed = True
            return None
        return _convert.generate_chunk(message)

    def close(self) -> None:
        """Cancel the call if it is still running (the server aborts the request)."""
        self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
