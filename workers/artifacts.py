"""The artifact store: image files under one root, a local folder or any fsspec URL.

``AIGC_ARTIFACT_ROOT`` may be a path (default ``DATA_DIR/artifacts``) or a URL fsspec knows
(``s3://bucket/prefix`` with s3fs installed, ``gs://``, ``memory://``, ``file:///…``); the
store never writes to remote storage by hand. Files are laid out as::

    ROOT/<job id>/<custom_id slug>-<hash>/000.png, 001.png, …, grid.png

Names come from the job id and custom_id only through :func:`safe_segment` (letters, digits,
``_`` and ``-``, length-capped, with a hash of the original so distinct ids never share a
folder), and every path is checked to lie inside the root before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re

import fsspec

from .errors import ArtifactPathError

SLUG_CHARS = 40  # of the custom_id kept readable in the folder name
HASH_CHARS = 12  # hex digits of sha256(custom_id): 48 bits, no collisions within a job
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.[a-z]{1,5}")


def safe_segment(text: str, *, always_hash: bool = True) -> str:
    """A path segment for ``text`` that cannot climb, hide, or carry separators or NULs.

    With ``always_hash=False`` an id that is already a plain segment (a uuid) is kept as is.
    """
    if not always_hash and _PLAIN_ID.match(text):
        return text
    slug = _UNSAFE.sub("-", text).strip("-")[:SLUG_CHARS].strip("-") or "item"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{slug}-{digest}"


class ArtifactStore:
    """Writes bytes under ``root`` and returns each file's URI (``file:///…``, ``s3://…``)."""

    def __init__(self, root: str):
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = "file" in _protocols(self.fs)
        if self.local:
            path = os.path.realpath(path)
            os.makedirs(path, exist_ok=True)
        self.root = path.rstrip("/") or "/"

    def item_folder(self, job_id: str, custom_id: str) -> str:
        """The folder of one item's files (not created: object stores have no folders)."""
        folder = posixpath.join(self.root, safe_segment(job_id, always_hash=False),
                                safe_segment(custom_id))
        self._check_inside(folder)
        return folder

    def write(self, folder: str, name: str, data: bytes) -> str:
        """Write ``data`` as ``folder/name``; its URI. Rewriting a file replaces it whole."""
        if not _FILE_NAME.fullmatch(name):
            raise ArtifactPathError(f"refusing artifact name {name!r}")
        path = posixpath.join(folder, name)
        self._check_inside(path)
        if self.local:
            os.makedirs(folder, exist_ok=True)
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as stream:
                stream.write(data)
            os.replace(temporary, path)  # readers never see half a file
        else:
            self.fs.pipe_file(path, data)
        return self.fs.unstrip_protocol(path)

    def _check_inside(self, path: str) -> None:
        resolved = os.path.realpath(path) if self.local else posixpath.normpath(path)
        root = self.root if self.root.endswith("/") else self.root + "/"
        if not resolved.startswith(root) or resolved == self.root:
            raise ArtifactPathError(f"artifact path {path!r} is outside the artifact root {self.root!r}")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
