"""FsspecStorage: the :class:`~ckptd.formats.storage.Storage` backend for fsspec URLs.

S3 (through s3fs) is the production target: ``put`` is a single atomic PUT and
``put_if_absent`` a conditional PUT with ``If-None-Match: *``, which S3 (and moto)
enforce, so commit markers are create-only across processes. Other fsspec
filesystems (``memory://``, ...) work with a check-then-write ``put_if_absent`` that
is atomic only within this process.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec.core
from fsspec.exceptions import FSTimeoutError

from ckptd.errors import CkptError, StorageError
from ckptd.formats.storage import (
    Buffer,
    ObjectNotFoundError,
    Storage,
    as_bytes_view,
    conflict_error,
    not_found_error,
)

T = TypeVar("T")


def _error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors meaning "the storage failed", the transient subset worth retrying)."""
    failed: list[type[BaseException]] = [OSError, FSTimeoutError]
    transient: list[type[BaseException]] = [ConnectionError, TimeoutError, FSTimeoutError]
    try:  # botocore comes with s3fs, which is optional for fsspec URLs in general
        from botocore import exceptions as boto

        failed += [boto.BotoCoreError, boto.ClientError]
        transient += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(failed), tuple(transient)


_BACKEND_ERRORS, _TRANSIENT_ERRORS = _error_types()


class FsspecStorage(Storage):
    """Any fsspec URL (``s3://bucket/prefix``, ``memory://root``, ...).

    Filesystems are created with ``skip_instance_cache=True`` and closed by
    :meth:`close`. S3 listings are not cached (other processes write the bucket).
    Transient errors are retried ``retries`` times with exponential backoff, on top of
    the retries botocore and s3fs already do.
    """

    def __init__(self, url: str, *, retries: int = 2, **storage_options: Any) -> None:
        """Open ``url``; ``storage_options`` go to the filesystem (S3: endpoint_url, key,
        secret, ...)."""
        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            storage_options.setdefault("use_listings_cache", False)
        self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.retries = retries
        self._is_s3 = "s3" in self.fs.protocol
        # S3 enforces If-None-Match: *; other fsspec backends only check-then-write.
        self.supports_conditional_put = self._is_s3
        self._create_lock = threading.Lock()

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _rel(self, path: str) -> str | None:
        path = self.fs._strip_protocol(path).rstrip("/")
        base = self.root + "/"
        return path[len(base) :] if path.startswith(base) else None

    def _call(self, op: str, key: str, fn: Callable[[], T], missing: bool = False) -> T:
        """Run ``fn`` with bounded retries, mapping backend errors to StorageError."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except CkptError:
                raise
            except FileNotFoundError as exc:
                if missing:
                    raise not_found_error(key, self.url) from exc
                raise StorageError(f"{op} {key!r} in {self.url}: not found: {exc}") from exc
            except _TRANSIENT_ERRORS as exc:
                if attempt == self.retries:
                    raise StorageError(
                        f"{op} {key!r} in {self.url} failed after {attempt + 1} attempts: {exc}"
                    ) from exc
                time.sleep(0.05 * 2**attempt)
            except _BACKEND_ERRORS as exc:
                raise StorageError(f"{op} {key!r} in {self.url}: {exc}") from exc
        raise AssertionError("unreachable")

    def _body(self, data: Buffer) -> bytes:
        # botocore accepts bytes or files, not memoryviews: one copy for remote stores.
        return data if isinstance(data, bytes) else bytes(as_bytes_view(data))

    def _get(self, key: str) -> bytes:
        return self._call("get", key, lambda: self.fs.cat_file(self._path(key)), missing=True)

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        if start == end:
            self._size(key)  # still report a missing object
            return b""
        path = self._path(key)
        try:
            return self._call(
                "get_range", key, lambda: self.fs.cat_file(path, start=start, end=end), True
            )
        except StorageError:
            # S3 answers 416 for a range starting past the end; mirror slicing instead.
            if start >= self._size(key):
                return b""
            raise

    def _put(self, key: str, data: Buffer) -> None:
        body = self._body(data)
        self._call("put", key, lambda: self.fs.pipe_file(self._path(key), body))

    def _put_if_absent(self, key: str, data: Buffer) -> None:
        body = self._body(data)
        path = self._path(key)
        retried = False

        def create() -> None:
            nonlocal retried
            try:
                self.fs.pipe_file(path, body, mode="create")
            except FileExistsError:
                # A retry after a lost response may find our own first attempt.
                if retried and self.fs.cat_file(path) == body:
                    return
                raise conflict_error(key, self.url) from None
            except _TRANSIENT_ERRORS:
                retried = True
                raise

        if self._is_s3:
            self._call("put_if_absent", key, create)
        else:
            with self._create_lock:  # best effort: only atomic within this process
                self._call("put_if_absent", key, create)

    def _exists(self, key: str) -> bool:
        return self._call("exists", key, lambda: bool(self.fs.isfile(self._path(key))))

    def _size(self, key: str) -> int:
        info = self._call("size", key, lambda: self.fs.info(self._path(key)), missing=True)
        if info.get("type") != "file":
            raise not_found_error(key, self.url)
        return int(info["size"])

    def _delete(self, key: str, missing_ok: bool) -> None:
        if not missing_ok and not self._exists(key):
            raise not_found_error(key, self.url)
        try:
            self._call("delete", key, lambda: self.fs.rm_file(self._path(key)), missing=True)
        except ObjectNotFoundError:
            if not missing_ok:
                raise

    def _delete_prefix(self, prefix: str) -> None:
        paths = [self._path(k) for k in self._list(prefix)]
        if paths:
            self._call("delete_prefix", prefix, lambda: self.fs.rm(paths))
        if not self._is_s3:
            # Filesystems with real (or pseudo, memory://) directories keep empty ones,
            # which list_dirs would still report: remove them too.
            dirs = [prefix] if prefix else self._list_dirs("")
            for d in dirs:
                path = self._path(d)
                if self.fs.isdir(path):
                    rm = functools.partial(self.fs.rm, path, recursive=True)
                    self._call("delete_prefix", d, rm)

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            found = self._call("list", prefix, lambda: self.fs.find(base), missing=True)
        except ObjectNotFoundError:
            return []
        start = prefix + "/" if prefix else ""
        rels = (self._rel(p) for p in found)
        return [r for r in rels if r is not None and r.startswith(start)]

    def _list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            entries = self._call(
                "list_dirs", prefix, lambda: self.fs.ls(base, detail=True), missing=True
            )
        except ObjectNotFoundError:
            return []
        names = []
        for e in entries:
            rel = self._rel(e["name"])
            if e.get("type") == "directory" and rel is not None:
                names.append(rel.rsplit("/", 1)[-1])
        return names

    def close(self) -> None:
        """Close the S3 client session (s3fs has no public close) and drop caches."""
        self.fs.invalidate_cache()
        creator = getattr(self.fs, "_s3creator", None)
        if creator is not None:
            type(self.fs).close_session(self.fs.loop, creator)
            self.fs._s3creator = None
            self.fs._s3 = None
