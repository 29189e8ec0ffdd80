"""Single-process behaviour of ckpt.save / ckpt.load (no torch.distributed)."""

from __future__ import annotations

import json
import os
import random
import threading

import numpy as np
import pytest
import torch

import ckpt
from ckpt.config import Config
from ckptd.errors import MissingKeysError, ReshardError, StagingBudgetError
from ckptd.formats.manifest import parse_group_metadata


@pytest.fixture(autouse=True)
def _fresh_client():
    ckpt.configure(Config())
    yield
    ckpt.shutdown()
    ckpt.configure(Config())


def _model_and_optim(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _manifest(root, step):
    with open(os.path.join(root, f"step-{step:09d}", "zarr.json"), "rb") as f:
        return parse_group_metadata(f.read(), "test")


def test_module_and_adam_roundtrip_bit_exact(tmp_path):
    model, opt = _model_and_optim(0)
    ckpt.save({"model": model, "optim": opt}, 3, str(tmp_path))
    model2, opt2 = _model_and_optim(1)  # different values everywhere
    res = ckpt.load({"model": model2, "optim": opt2}, str(tmp_path), strict=True)
    assert res.step == 3 and not res.missing and not res.unexpected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid, st in s1["state"].items():
        for name, t in st.items():
            assert torch.equal(t, s2["state"][pid][name]), (pid, name)
    assert s2["param_groups"][0]["lr"] == 1e-3


def test_fresh_optimizer_without_state_is_filled(tmp_path):
    model, opt = _model_and_optim(0)
    ckpt.save({"model": model, "optim": opt}, 1, str(tmp_path))
    torch.manual_seed(5)
    model2 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)  # state is empty until a step
    ckpt.load({"model": model2, "optim": opt2}, str(tmp_path), strict=True)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        assert torch.equal(s1[pid]["exp_avg_sq"], s2[pid]["exp_avg_sq"])
        assert torch.equal(s1[pid]["step"], s2[pid]["step"])


def test_blocking_save_writes_from_live_tensors_without_staging(tmp_path):
    state = {"w": torch.randn(512, 512)}
    ckpt.save(state, 1, str(tmp_path))
    assert ckpt.api._get_saver()._pool._free[0].buf.numel() == 0  # no arena was needed
    out = {"w": torch.zeros(512, 512)}
    ckpt.load(out, str(tmp_path))
    assert torch.equal(out["w"], state["w"])


def test_async_snapshot_is_isolated_from_later_updates(tmp_path):
    t = torch.arange(1 << 16, dtype=torch.float32)
    state = {"w": t}
    h = ckpt.save(state, 1, str(tmp_path), blocking=False)
    t.add_(1000)  # training goes on and updates the tensor in place
    h.wait()
    out = {"w": torch.zeros_like(t)}
    ckpt.load(out, str(tmp_path))
    assert torch.equal(out["w"], torch.arange(1 << 16, dtype=torch.float32))


def test_staging_memory_is_reused_across_saves(tmp_path):
    state = {"a": torch.randn(256, 256), "b": torch.randn(1000)}
    ckpt.save(state, 1, str(tmp_path), blocking=False).wait()
    saver = ckpt.api._get_saver()
    arena = saver._pool._free[0]
    ptr = arena.buf.data_ptr()
    for step in range(2, 5):
        ckpt.save(state, step, str(tmp_path), blocking=False).wait()
    assert saver._pool._free[0].buf.data_ptr() == ptr


def test_staging_budget_too_small_is_a_clear_error(tmp_path):
    ckpt.configure(staging_budget_bytes=1024)
    with pytest.raises(StagingBudgetError, match="staging_budget_bytes"):
        ckpt.save({"a": torch.randn(1024)}, 1, str(tmp_path), blocking=False)
    assert not os.path.exists(tmp_path / "step-000000001")


def test_backpressure_one_save_in_flight(tmp_path, monkeypatch):
    """A second save waits until the first has released its staging memory."""
    import ckpt.saver as save_mod

    gate = threading.Event()
    orig = save_mod.Saver._write

    def slow_write(self, job):
        gate.wait(10)
        return orig(self, job)

    monkeypatch.setattr(save_mod.Saver, "_write", slow_write)
    state = {"a": torch.randn(128)}
    h1 = ckpt.save(state, 1, str(tmp_path), blocking=False)
    started = threading.Event()
    done = threading.Event()

    def second():
        started.set()
        ckpt.save(state, 2, str(tmp_path), blocking=False)
        done.set()

    th = threading.Thread(target=second)
    th.start()
    started.wait(5)
    assert not done.wait(0.5), "second save staged while the first still held the staging memory"
    gate.set()
    h1.wait(10)
    assert done.wait(10)
    th.join()
    ckpt.wait()


def test_strict_and_non_strict_keys(tmp_path):
    ckpt.save({"a": torch.ones(3), "b": torch.ones(2)}, 1, str(tmp_path))
    with pytest.raises(MissingKeysError) as ei:
        ckpt.load({"a": torch.zeros(3), "c": torch.zeros(1)}, str(tmp_path), strict=True)
    assert ei.value.missing == ["c"] and ei.value.unexpected == ["b"]
    out = {"a": torch.zeros(3), "c": torch.zeros(1)}
    res = ckpt.load(out, str(tmp_path))
    assert res.missing == ("c",) and res.unexpected == ("b",)
    assert torch.equal(out["a"], torch.ones(3))


def test_shape_and_dtype_mismatch_name_the_tensor(tmp_path):
    ckpt.save({"layer.w": torch.ones(3, 2)}, 1, str(tmp_path))
    with pytest.raises(ReshardError, match=r"layer\.w"):
        ckpt.load({"layer.w": torch.zeros(2, 3)}, str(tmp_path))
    with pytest.raises(ReshardError, match=r"layer\.w"):
        ckpt.load({"layer.w": torch.zeros(3, 2, dtype=torch.float64)}, str(tmp_path))


def test_trainer_state_and_rng_restored(tmp_path):
    trainer = {"step": 7, "sched": {"last_epoch": 7, "lrs": [0.1, 0.2]}, "name": "run"}
    state = {"w": torch.randn(4), "trainer": trainer, "rng": ckpt.RNGState()}
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    ckpt.save(state, 7, str(tmp_path))
    expect = (torch.rand(3), np.random.rand(2), random.random())
    trainer2 = {"step": 0, "sched": {"last_epoch": 0, "lrs": []}, "name": ""}
    torch.manual_seed(0)
    ckpt.load({"w": torch.zeros(4), "trainer": trainer2, "rng": ckpt.RNGState()}, str(tmp_path))
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expect[0], got[0]) and (expect[1] == got[1]).all() and expect[2] == got[2]
    assert trainer2 == trainer  # the trainer's own dict objects were filled


def test_dtypes_and_edge_shapes_roundtrip(tmp_path):
    state = {
        "bf16": torch.randn(33, 7).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "i64": torch.arange(-5, 5),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(700, 700),  # > 1 MiB: unpacked, several chunks with small target
    }
    ckpt.configure(
        plan=ckpt.api.get_config().plan.__class__(
            target_chunk_bytes=256 << 10, min_aligned_chunk_bytes=64 << 10
        )
    )
    ckpt.save(state, 2, str(tmp_path))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(out, str(tmp_path), strict=True)
    for k in state:
        assert torch.equal(out[k], state[k]), k
    man = _manifest(str(tmp_path), 2)
    assert len(man.tensors["big"].chunks) > 1


def test_codec_auto_compresses_only_what_pays(tmp_path):
    state = {"zeros": torch.zeros(1 << 18), "noise": torch.randn(1 << 18)}
    ckpt.save(state, 1, str(tmp_path))
    man = _manifest(str(tmp_path), 1)
    assert man.tensors["zeros"].codec == "zstd"
    assert man.tensors["noise"].codec == "raw"


def test_many_small_tensors_become_few_objects(tmp_path):
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(2000)}
    ckpt.save(state, 1, str(tmp_path))
    files = [f for _, _, fs in os.walk(tmp_path / "step-000000001") for f in fs]
    assert len(files) <= 5, files
    out = {k: torch.zeros(16) for k in state}
    ckpt.load(out, str(tmp_path), strict=True)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_retention_keeps_last_k(tmp_path):
    from ckptd.formats.retention import RetentionPolicy

    ckpt.configure(retention=RetentionPolicy(keep_last=2, keep_every=4))
    for step in range(1, 8):
        ckpt.save({"a": torch.ones(2) * step}, step, str(tmp_path))
    ckpt.wait()
    steps = sorted(d for d in os.listdir(tmp_path) if d.startswith("step-"))
    assert steps == ["step-000000004", "step-000000006", "step-000000007"]
    assert (tmp_path / "latest").read_text().strip() == "7"


def test_layout_resharding_in_one_process(tmp_path):
    """Save as two TP shards held by one process, load as a whole tensor."""
    full = torch.randn(6, 4)
    state = {"w0": full[:3].clone(), "w1": full[3:].clone()}
    layout = ckpt.Layout(
        rules={"w0": ckpt.Split(0, 0, 2), "w1": ckpt.Split(0, 1, 2)},
        rename=lambda k: "w",
    )
    ckpt.save(state, 1, str(tmp_path), layout=layout)
    out = {"w": torch.zeros(6, 4)}
    ckpt.load(out, str(tmp_path), strict=True)
    assert torch.equal(out["w"], full)
    man = json.loads((tmp_path / "step-000000001" / "zarr.json").read_text())
    assert man["attributes"]["ckpt"]["tensors"]["w"]["shape"] == [6, 4]


def test_load_with_a_spec_reshards_a_universal_checkpoint(tmp_path):
    """A live TP-sharded model loads a canonical checkpoint through a reshard spec."""
    from ckptd.converters.spec import compile_spec

    full = {"layers.0.fc1.weight": torch.randn(8, 4), "layers.0.fc2.weight": torch.randn(4, 8)}
    ckpt.save(dict(full), 1, str(tmp_path))
    text = "layers.{i}.fc1.weight : split(dim=0)\nlayers.{i}.fc2.weight : split(dim=1)\n"
    for r in range(2):
        spec = compile_spec(text, {"tp": 2}, {"tp": r})
        shard = {"layers.0.fc1.weight": torch.zeros(4, 4), "layers.0.fc2.weight": torch.zeros(4, 4)}
        ckpt.load(shard, str(tmp_path), spec=spec, strict=False)
        assert torch.equal(
            shard["layers.0.fc1.weight"], full["layers.0.fc1.weight"][4 * r : 4 * r + 4]
        )
        assert torch.equal(
            shard["layers.0.fc2.weight"], full["layers.0.fc2.weight"][:, 4 * r : 4 * r + 4]
        )
