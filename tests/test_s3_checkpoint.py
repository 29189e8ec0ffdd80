"""Save and load through s3fs against a real S3 server (moto) on loopback.

Every test uses a fresh bucket and passes the endpoint and fake credentials
explicitly (``s3_options``), so nothing can reach a real cloud endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ckptd.errors import CkptError, CommitConflictError, NotCommittedError
from ckptd.formats import commit as commit_mod
from ckptd.formats.storage import FaultPlan, Storage, open_storage
from ckptd.formats.writer import WriterOptions
from ckptd.planner import PlanOptions

pytestmark = pytest.mark.s3


def make_state(seed: int) -> dict[str, Any]:
    """An unpacked multi-chunk tensor, packed fp32/bf16/int64 tensors, JSON values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(16, generator=g),
        "h": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "n": torch.randint(0, 1 << 40, (20,), generator=g),
        "trainer": {"step": seed, "lr": 0.25 * seed},
    }


def blank(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": -1, "lr": -1.0}
        for k, v in state.items()
    }


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


@pytest.fixture
def ck(ckpt_client: Any) -> Any:
    ckpt_client.configure(
        writer=WriterOptions(workers=2, small_tensor_bytes=1024),
        plan=PlanOptions(target_chunk_bytes=2048, min_aligned_chunk_bytes=512),
    )
    return ckpt_client


@pytest.fixture
def root(s3_bucket: Callable[[], str]) -> str:
    return f"s3://{s3_bucket()}/runs/r1"


@pytest.fixture
def store(root: str, s3_options: dict[str, str]) -> Any:
    """An independent client on the same root (like another process would open)."""
    st = open_storage(root, **s3_options)
    yield st
    st.close()


def test_blocking_and_async_save_load_bit_exact(
    ck: Any, root: str, s3_options: dict[str, str], store: Storage
) -> None:
    s1, s2 = make_state(1), make_state(2)
    r1 = ck.save(s1, 1, root, storage_options=s3_options).wait()
    assert r1.committed and r1.step == 1
    h = ck.save(s2, 2, root, blocking=False, storage_options=s3_options)
    s2_copy = {k: v.clone() if isinstance(v, torch.Tensor) else dict(v) for k, v in s2.items()}
    for t in (s2["w"], s2["b"]):
        t.add_(1)  # the save works on its staged snapshot, not on the live tensors
    assert h.wait(timeout=60).committed

    assert store.get("latest") == b"2\n"
    assert commit_mod.committed_steps(store) == [1, 2]
    keys = store.list("step-000000002")
    assert "step-000000002/COMMITTED" in keys and "step-000000002/zarr.json" in keys
    assert "step-000000002/w/c/3/0" in keys  # an unpacked array ...
    assert any(k.startswith("step-000000002/packs/") for k in keys)  # ... and a pack

    dst = blank(s1)
    res = ck.load(dst, root, storage_options=s3_options, strict=True)
    assert res.step == 2 and res.missing == () and res.unexpected == ()
    assert_same(dst, s2_copy)
    dst = blank(s1)
    assert ck.load(dst, root, step=1, storage_options=s3_options).step == 1
    assert_same(dst, s1)


def test_commit_marker_is_a_conditional_put(
    ck: Any, root: str, s3_options: dict[str, str], store: Storage, s3_server: str
) -> None:
    s1 = make_state(1)
    ck.save(s1, 1, root, storage_options=s3_options)
    assert store.supports_conditional_put
    marker = store.get(commit_mod.marker_key(1))

    # A second commit of the same step, from another client: refused by the server.
    with pytest.raises(CommitConflictError, match="already exists"):
        commit_mod.commit(store, 1, {"manifest_crc32c": 0})
    assert store.get(commit_mod.marker_key(1)) == marker

    # The refusal comes from S3 itself (If-None-Match: *), not from a check in our client.
    import boto3
    from botocore.exceptions import ClientError

    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as ei:
        s3.put_object(
            Bucket=bucket, Key=f"{prefix}/{commit_mod.marker_key(1)}", Body=b"{}", IfNoneMatch="*"
        )
    assert ei.value.response["Error"]["Code"] == "PreconditionFailed"

    # ckpt.save of an already committed step fails and leaves the checkpoint intact.
    with pytest.raises(CkptError, match="already committed"):
        ck.save(make_state(5), 1, root, storage_options=s3_options)
    dst = blank(s1)
    ck.load(dst, root, storage_options=s3_options)
    assert_same(dst, s1)


def test_uncommitted_step_is_invisible(
    ck: Any, root: str, s3_options: dict[str, str], store: Storage
) -> None:
    s1 = make_state(1)
    ck.save(s1, 1, root, storage_options=s3_options)
    ck.save(make_state(2), 2, root, storage_options=s3_options)
    store.delete(commit_mod.marker_key(2))  # step 2's bytes are all there, but no marker

    with pytest.raises(NotCommittedError, match=r"step 2 is not committed.*uncommitted.*\[2\]"):
        ck.load(blank(s1), root, step=2, storage_options=s3_options)
    dst = blank(s1)
    assert ck.load(dst, root, storage_options=s3_options).step == 1  # `latest` falls back
    assert_same(dst, s1)
    with pytest.raises(NotCommittedError):
        ck.load(blank(s1), root, step=7, storage_options=s3_options)


def test_failed_commit_on_s3_leaves_nothing(
    ck: Any, inject_faults: Any, root: str, s3_options: dict[str, str], store: Storage
) -> None:
    s1 = make_state(1)
    ck.save(s1, 1, root, storage_options=s3_options)
    inject_faults(FaultPlan(op="put_if_absent", key_glob="step-000000002/COMMITTED", times=1))
    h = ck.save(make_state(2), 2, root, blocking=False, storage_options=s3_options)
    with pytest.raises(CkptError, match="injected fault"):
        h.wait(timeout=60)
    assert store.list("step-000000002") == []
    assert store.get("latest") == b"1\n"
    dst = blank(s1)
    assert ck.load(dst, root, storage_options=s3_options).step == 1
    assert_same(dst, s1)


def test_load_from_empty_root(ck: Any, root: str, s3_options: dict[str, str]) -> None:
    with pytest.raises(NotCommittedError, match="no committed checkpoint"):
        ck.load(blank(make_state(1)), root, storage_options=s3_options)
