"""Uploads streamed from the request into the artifact store, never held whole in memory.

``POST /v1/files`` is multipart (``purpose`` and ``file``). python-multipart parses the body
as it arrives; the file part's bytes go straight to an fsspec file under
``ARTIFACT_ROOT/files/`` (a local folder, or ``s3://`` and the like), written from a thread so
the event loop never waits on storage. Past the size limit nothing more is stored, the partial
file is removed, and the rest of the body is read and dropped (up to a bound) so that the
client, still sending, gets to read the 413 rather than a reset connection.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from .errors import APIError

MAX_FIELD_BYTES = 64 * 1024  # a form field (purpose) is a word, not a payload
MAX_FIELDS = 16
DRAIN_BYTES = 64 * 1024 * 1024  # read past the limit at most this much before hanging up
READ_CHUNK = 1 << 20


class FileStore:
    """Uploaded files under ``ROOT/files/<file id>``; ``ROOT`` is the artifact root."""

    def __init__(self, root: str):
        self.fs, path = fsspec.core.url_to_fs(root)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self.local = "file" in protocols
        if self.local:
            path = os.path.realpath(path)
        self.folder = posixpath.join(path.rstrip("/") or "/", "files")
        self.fs.makedirs(self.folder, exist_ok=True)

    def path(self, file_id: str) -> str:
        return posixpath.join(self.folder, file_id)  # ids are file-<hex>: no separators

    def uri(self, file_id: str) -> str:
        return self.fs.unstrip_protocol(self.path(file_id))

    def open_for_writing(self, file_id: str) -> BinaryIO:
        return self.fs.open(self.path(file_id) + ".part", "wb")

    def commit(self, file_id: str) -> None:
        self.fs.mv(self.path(file_id) + ".part", self.path(file_id))

    def discard(self, file_id: str) -> None:
        for name in (self.path(file_id) + ".part", self.path(file_id)):
            try:
                self.fs.rm(name)
            except FileNotFoundError:
                pass

    def open(self, uri: str) -> BinaryIO:
        """A stored upload for reading (by the URI its row carries)."""
        return fsspec.open(uri, "rb").open()

    def chunks(self, uri: str) -> Iterator[bytes]:
        with self.open(uri) as stream:
            while chunk := stream.read(READ_CHUNK):
                yield chunk


@dataclass
class Upload:
    """What a multipart upload carried: its form fields, and its file (stored, or too large)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    too_large: bool = False


class _Receiver:
    """python-multipart callbacks: fields kept in memory (small), the file's bytes queued for
    the store after each network chunk."""

    def __init__(self, limit: int):
        self.limit = limit
        self.upload = Upload()
        self.pending: list[bytes] = []
        self.file_started = False
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._data = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options and self._name == "file":
            if self.file_started:
                raise APIError(400, "Only one file can be uploaded at a time.", param="file")
            self._is_file = self.file_started = True
            self.upload.filename = options[b"filename"].decode("utf-8", "replace")[:255]
        elif len(self.upload.fields) >= MAX_FIELDS:
            raise APIError(400, "Too many form fields.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            if len(self._data) + end - start > MAX_FIELD_BYTES:
                raise APIError(400, f"Form field {self._name!r} is too long.", param=self._name)
            self._data += data[start:end]
            return
        self.upload.bytes += end - start
        if self.upload.bytes > self.limit:
            self.upload.too_large = True
        if not self.upload.too_large:
            self.pending.append(data[start:end])

    def on_part_end(self) -> None:
        if not self._is_file and self._name:
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")


async def receive(stream: AsyncIterator[bytes], content_type: str, store: FileStore,
                  file_id: str, limit: int) -> Upload:
    """Parse a multipart body from ``stream``, storing its ``file`` part as ``file_id``.

    The stored file is committed (renamed into place) only when the whole body was read and
    the file was within ``limit``; otherwise nothing of it remains.
    """
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(415, "Uploads must be multipart/form-data with 'purpose' and 'file' fields.")
    receiver = _Receiver(limit)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    sink: BinaryIO | None = None
    read = 0
    try:
        async for chunk in stream:
            read += len(chunk)
            if receiver.upload.too_large:
                if sink is not None:
                    await run_in_threadpool(sink.close)
                    sink = None
                    await run_in_threadpool(store.discard, file_id)
                if read > limit + DRAIN_BYTES:
                    break  # enough politeness: the connection closes after the 413
                continue
            parser.write(chunk)
            if receiver.file_started and sink is None and not receiver.upload.too_large:
                sink = await run_in_threadpool(store.open_for_writing, file_id)
            if receiver.pending and sink is not None:
                data, receiver.pending = b"".join(receiver.pending), []
                await run_in_threadpool(sink.write, data)
        if not receiver.upload.too_large:
            parser.finalize()
    except FormParserError as exc:
        await _abandon(sink, store, file_id)
        raise APIError(400, f"Invalid multipart body: {exc}") from None
    except BaseException:
        await _abandon(sink, store, file_id)
        raise
    if receiver.upload.too_large:  # it may have crossed the limit in the last chunk
        await _abandon(sink, store, file_id)
    elif sink is not None:
        await run_in_threadpool(sink.close)
        await run_in_threadpool(store.commit, file_id)
    elif receiver.file_started:  # an empty file: nothing was written, but it exists
        sink = await run_in_threadpool(store.open_for_writing, file_id)
        await run_in_threadpool(sink.close)
        await run_in_threadpool(store.commit, file_id)
    return receiver.upload


async def _abandon(sink: BinaryIO | None, store: FileStore, file_id: str) -> None:
    if sink is not None:
        await run_in_threadpool(sink.close)
    await run_in_threadpool(store.discard, file_id)
