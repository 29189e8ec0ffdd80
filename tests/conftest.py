"""Shared pytest fixtures. Keep each fixture small and documented; add new ones by topic."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

# --------------------------------------------------------------------- S3 (moto)

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 server (moto) on loopback for the whole session; yields its endpoint.

    Sets fake credentials and ``AWS_DEFAULT_REGION`` so that nothing can reach a real
    cloud endpoint; tests isolate themselves with fresh buckets (``s3_bucket``).
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1," + os.environ.get("NO_PROXY", ""))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Callable[[], str]:
    """Returns a function that creates a fresh, uniquely named bucket and returns its name."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )

    def make() -> str:
        name = f"ckptd-test-{uuid.uuid4().hex[:16]}"
        client.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture
def s3_storage_factory(s3_server: str, s3_bucket: Callable[[], str]) -> Iterator[Callable]:
    """Returns ``make(prefix="root", bucket=None) -> FsspecStorage``, closed after the test.

    Each call opens its own filesystem client (like another process would); without
    ``bucket`` it uses a fresh bucket, whose name is ``storage.url.split("/")[2]``.
    """
    from ckptd.formats.storage import open_storage

    opened = []

    def make(prefix: str = "root", bucket: str | None = None):
        storage = open_storage(
            f"s3://{bucket or s3_bucket()}/{prefix}", endpoint_url=s3_server, **S3_CREDENTIALS
        )
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


@pytest.fixture
def s3_options(s3_server: str) -> dict[str, str]:
    """``storage_options`` for ``ckpt.save/load`` against the loopback S3 server."""
    return {"endpoint_url": s3_server, **S3_CREDENTIALS}


# ------------------------------------------------------------- ckpt client state


@pytest.fixture
def ckpt_client() -> Iterator[object]:
    """The ``ckpt`` module with its process state isolated for one test.

    Saves the configuration, and on teardown waits for pending saves, drops cached
    storage handles (``ckpt.shutdown``) and restores the configuration, so a test may
    call ``ckpt.configure(...)`` freely.
    """
    import ckpt

    saved = ckpt.get_config()
    ckpt.shutdown()
    try:
        yield ckpt
    finally:
        try:
            ckpt.shutdown()
        finally:
            ckpt.configure(saved)


@pytest.fixture
def inject_faults(monkeypatch: pytest.MonkeyPatch, ckpt_client: object) -> Callable:
    """Returns ``install(plan | [plans]) -> list[FaultyStorage]``.

    After ``install``, every storage that ``ckpt.save``/``ckpt.load`` open is wrapped in
    a :class:`~ckptd.formats.storage.FaultyStorage` with those plans (one wrapper per
    root, so calls are counted across saves); the returned list fills with the wrappers
    as they are created, for assertions on ``.injected``. Undone after the test.
    """
    import ckpt.api
    from ckptd.formats.storage import FaultPlan, FaultyStorage

    def install(plan: FaultPlan | list[FaultPlan]) -> list[FaultyStorage]:
        original = ckpt.api._storage
        wrappers: dict[int, FaultyStorage] = {}
        created: list[FaultyStorage] = []

        def faulty(root: str, options: object) -> FaultyStorage:
            inner = original(root, options)
            w = wrappers.get(id(inner))
            if w is None:
                w = wrappers[id(inner)] = FaultyStorage(inner, plan)
                created.append(w)
            return w

        monkeypatch.setattr(ckpt.api, "_storage", faulty)
        return created

    return install
