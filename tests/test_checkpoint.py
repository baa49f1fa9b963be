"""Checkpoints: safetensors + JSON, atomic, verified; damaged files give a clear error and the
previous checkpoint stays usable; load_model rebuilds a sampler-ready model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    latest_valid_checkpoint,
    load_model,
    merge_state,
    read_checkpoint,
    save_checkpoint,
    split_state,
)
from jumpflow.io import atomic_write
from jumpflow.trainer import train

TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "task.eval_samples=256", "task.eval_projections=32",
        "trainer.batch_size=32", "optim.warmup_steps=2", "optim.lr=1e-3", "ema.decay=0.9",
        "trainer.eval_every=0", "trainer.eval_at_end=false"]


def make_cfg(run_dir, *overrides):
    with initialize_config_module("jumpflow.configs", version_base=None):
        return compose("train", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


def params(path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 9-step run keeping its checkpoints at 6 and 9, and a reference without intermediate ones."""
    root = tmp_path_factory.mktemp("ckpt")
    train(make_cfg(root / "run", "trainer.max_steps=9", "trainer.ckpt_every=3", "task.conditional=true"))
    train(make_cfg(root / "ref", "trainer.max_steps=9", "trainer.ckpt_every=0", "task.conditional=true"))
    return root


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_layout_and_json_metadata(run):
    paths = checkpoint_paths(run / "run" / "checkpoints")
    assert [p.name for p in paths] == ["ckpt_000000006.json", "ckpt_000000009.json"]
    files = sorted(p.name for p in (run / "run" / "checkpoints").iterdir())
    assert all(f.endswith((".json", ".safetensors")) for f in files)      # no pickles, no temporaries
    meta = json.loads(paths[-1].read_text())
    assert meta["step"] == 9 and meta["data"] == {"epoch": 0, "batch_in_epoch": 9, "step": 9}
    assert len(meta["sha256"]) == 64 and meta["config"]["trainer"]["max_steps"] == 9
    assert meta["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.95]}
    assert meta["scheduler"]["last_epoch"] == 9 and "python" in meta["rng"]
    tensors, _ = read_checkpoint(paths[-1])
    assert {"rng.torch_cpu", "rng.data_sampler", "ema.n_averaged"} <= set(tensors)
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in tensors)


def test_split_merge_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict = {}
    skeleton = split_state(opt.state_dict(), "optim", tensors)
    back = merge_state(json.loads(json.dumps(skeleton)), tensors)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)


def test_keeps_newest_and_ignores_stray_temporaries(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"x": step}, keep=2)
    (tmp_path / ".ckpt_000000005.safetensors.tmp-1").write_bytes(b"partial")   # a killed writer
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt_000000003.json", "ckpt_000000004.json"]
    tensors, meta = read_checkpoint(tmp_path / "ckpt_000000004.safetensors")
    assert meta["x"] == 4 and torch.equal(tensors["w"], torch.full((2,), 4.0))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "bad_json", "missing"])
def test_damaged_checkpoint_clear_error_and_previous_usable(run, tmp_path, damage, capfd):
    d = copy_run(run / "run", tmp_path / "run")
    newest = d / "checkpoints" / "ckpt_000000009.json"
    st = newest.with_suffix(".safetensors")
    if damage == "truncate":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
        expect = "truncated"
    elif damage == "flip_byte":
        data = bytearray(st.read_bytes())
        data[len(data) // 2] ^= 0x01
        st.write_bytes(bytes(data))
        expect = "modified"
    elif damage == "bad_json":
        newest.write_text(newest.read_text()[:100])
        expect = "unreadable"
    else:
        st.unlink()
        expect = "missing"
    with pytest.raises(CheckpointError, match=expect) as err:
        read_checkpoint(newest)
    msg = str(err.value)
    assert "ckpt_000000009" in msg and "ckpt_000000006.json is still usable" in msg and "\n" not in msg
    # the previous checkpoint loads, and resume falls back to it (with a warning naming the bad file)
    path, _, meta = latest_valid_checkpoint(d / "checkpoints", warn=lambda m: None)
    assert path.name == "ckpt_000000006.json" and meta["step"] == 6
    out = train(make_cfg(d, "trainer.max_steps=9", "trainer.ckpt_every=3", "task.conditional=true",
                         "resume=true"))
    assert out["step"] == 9
    assert "skipping damaged checkpoint" in capfd.readouterr().err
    got = params(checkpoint_paths(d / "checkpoints")[-1])
    ref = params(checkpoint_paths(run / "ref" / "checkpoints")[-1])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_resume_from_explicit_damaged_path_fails(run, tmp_path):
    d = copy_run(run / "run", tmp_path / "run")
    st = d / "checkpoints" / "ckpt_000000009.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="ckpt_000000009.safetensors is truncated"):
        train(make_cfg(d, "trainer.max_steps=9", f"resume={st.with_suffix('.json')}"))


def test_resume_rejects_a_different_model(run, tmp_path):
    d = copy_run(run / "run", tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not match the model"):
        train(make_cfg(d, "trainer.max_steps=9", "task.conditional=true", "++backbone.width=16", "resume=true"))


def test_load_model_uses_ema_and_samples(run):
    model, cfg = load_model(run / "run")
    assert cfg.trainer.max_steps == 9 and not model.training
    tensors, _ = read_checkpoint(checkpoint_paths(run / "run" / "checkpoints")[-1])
    w = dict(model.named_parameters())["backbone.inp.weight"]
    assert torch.equal(w, tensors["ema.module.backbone.inp.weight"])
    raw, _ = load_model(run / "run" / "checkpoints" / "ckpt_000000006.safetensors", use_ema=False)
    tensors3, _ = read_checkpoint(run / "run" / "checkpoints" / "ckpt_000000006.json")
    assert torch.equal(dict(raw.named_parameters())["backbone.inp.weight"], tensors3["model.backbone.inp.weight"])
    x = model.generate(torch.tensor([0, 1, 2]), steps=1)
    assert x.shape == (3, 2) and torch.isfinite(x).all()
    assert "sliced_w2_nfe1" in model.task.evaluate(model, str(run / "run"), 9)


def test_no_pickle_in_checkpoint_code():
    import jumpflow.checkpoint as ck
    import jumpflow.trainer as tr

    for mod in (ck, tr):
        src = Path(mod.__file__).read_text()
        assert "torch.load" not in src and "import pickle" not in src


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    import numpy as np

    path = tmp_path / "stats.npz"
    atomic_write(path, lambda tmp: np.savez(tmp, mu=np.arange(3)))
    with np.load(path) as f:                                  # the suffix survived: no "x.npz.npz"
        assert f["mu"].tolist() == [0, 1, 2]

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    with np.load(path) as f:
        assert f["mu"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]   # no temporary left behind
