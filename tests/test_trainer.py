"""The one training loop: exact resume after kill -9, determinism, schedules, EMA, data order,
debug switch, CLI (--help, --cfg job, multirun)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.checkpoint import checkpoint_paths, read_checkpoint, unprefixed
from jumpflow.trainer import GlobalBatchSampler, ema_decay, lr_factor, train

TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "task.eval_samples=256", "task.eval_projections=32",
        "trainer.batch_size=32", "trainer.log_every=1", "optim.warmup_steps=2", "optim.lr=1e-3",
        "ema.decay=0.9", "trainer.eval_every=0", "trainer.eval_at_end=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def make_cfg(run_dir, *overrides):
    with initialize_config_module("jumpflow.configs", version_base=None):
        return compose("train", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


def final_state(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(checkpoint_paths(Path(run_dir) / "checkpoints")[-1])
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "jumpflow.cli.train", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout, check=False, **kw)


# ------------------------------------------------------------------ exact resume after kill -9
def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    """A CLI run killed with SIGKILL right after its first checkpoint, then resumed with
    resume=true, ends with the parameters (model and EMA) of an uninterrupted run."""
    steps = 40
    common = ["objective=meanflow", "task.conditional=true", "task.cond_dim=8", f"trainer.max_steps={steps}",
              "ema.power=0.75", "ema.decay=0.999"]
    ref_dir = tmp_path / "ref"
    train(make_cfg(ref_dir, *common, "trainer.ckpt_every=0"))

    run_dir = tmp_path / "killed"
    args = [f"hydra.run.dir={run_dir}", *TINY, *common, "trainer.ckpt_every=10"]
    proc = subprocess.Popen([sys.executable, "-m", "jumpflow.cli.train", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while not checkpoint_paths(run_dir / "checkpoints"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [int(p.stem.split("_")[1]) for p in checkpoint_paths(run_dir / "checkpoints")]
    assert max(done) < steps, "the run finished before it was killed"

    resumed = cli(*args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {max(done)}" in resumed.stderr
    diff = max_diff(final_state(run_dir), final_state(ref_dir))
    print(f"killed at checkpoint {max(done)}; max |resumed - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-7


def test_training_time_adds_up_over_resumes(tmp_path, capsys):
    """Each checkpoint records the training loop's wall-clock seconds summed over resumes: a resume
    continues from the checkpoint's figure (here set to 1000 s by hand) and reports the step it
    started at; a checkpoint without the figure (written before it existed) restarts the count
    with a warning."""
    run_dir = tmp_path / "run"
    first = train(make_cfg(run_dir, "trainer.max_steps=6", "trainer.ckpt_every=3"))
    paths = checkpoint_paths(run_dir / "checkpoints")
    seconds = [read_checkpoint(p)[1]["train_seconds"] for p in paths]
    assert first["resumed_from_step"] == 0
    assert 0.0 < seconds[0] < seconds[1] <= first["train_seconds"]

    meta_path = paths[-1].with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "train_seconds": 1000.0}))
    t0 = time.perf_counter()
    resumed = train(make_cfg(run_dir, "trainer.max_steps=8", "trainer.ckpt_every=3", "resume=true"))
    wall = time.perf_counter() - t0
    assert resumed["resumed_from_step"] == 6
    assert 1000.0 < resumed["train_seconds"] < 1000.0 + wall
    assert read_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])[1]["train_seconds"] > 1000.0

    meta_path = checkpoint_paths(run_dir / "checkpoints")[-1].with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["train_seconds"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    again = train(make_cfg(run_dir, "trainer.max_steps=10", "trainer.ckpt_every=3", "resume=true"))
    assert again["resumed_from_step"] == 8
    assert 0.0 < again["train_seconds"] < 1000.0
    assert "does not record its training time" in capsys.readouterr().err

    # a damaged figure stops the resume in one line naming the file and the key, before config.yaml is rewritten
    meta_path = checkpoint_paths(run_dir / "checkpoints")[-1].with_suffix(".json")
    good_meta = json.loads(meta_path.read_text())
    config_before = (run_dir / "config.yaml").read_text()
    from jumpflow.checkpoint import CheckpointError
    for damaged in (float("nan"), True, -1.0, "12"):    # JSON true would read as 1 s if bools were numbers
        meta_path.write_text(json.dumps({**good_meta, "train_seconds": damaged}))
        with pytest.raises(CheckpointError, match=f"{meta_path.name}.*train_seconds"):
            train(make_cfg(run_dir, "trainer.max_steps=12", "trainer.ckpt_every=3", "resume=true", "seed=5"))
        assert (run_dir / "config.yaml").read_text() == config_before


def test_evaluation_does_not_change_training(tmp_path):
    """Periodic evaluation (sampling, its own RNG) leaves the trained parameters unchanged."""
    common = ["trainer.max_steps=8", "task.conditional=true"]
    a = train(make_cfg(tmp_path / "a", *common, "trainer.eval_every=3"))
    train(make_cfg(tmp_path / "b", *common))
    assert "eval/sliced_w2_nfe1" in a["metrics"]
    assert max_diff(final_state(tmp_path / "a"), final_state(tmp_path / "b")) == 0.0


def test_data_workers_do_not_change_the_run(tmp_path):
    """Items are seeded from (seed, epoch, index): DataLoader workers give the same run."""
    train(make_cfg(tmp_path / "a", "trainer.max_steps=4"))
    train(make_cfg(tmp_path / "b", "trainer.max_steps=4", "trainer.num_workers=2"))
    assert max_diff(final_state(tmp_path / "a"), final_state(tmp_path / "b")) == 0.0


def test_seed_fixes_the_run_and_changes_it(tmp_path):
    train(make_cfg(tmp_path / "a", "trainer.max_steps=4", "seed=3"))
    train(make_cfg(tmp_path / "b", "trainer.max_steps=4", "seed=3"))
    train(make_cfg(tmp_path / "c", "trainer.max_steps=4", "seed=4"))
    assert max_diff(final_state(tmp_path / "a"), final_state(tmp_path / "b")) == 0.0
    assert max_diff(final_state(tmp_path / "a"), final_state(tmp_path / "c")) > 1e-4


def test_cpu_threads_hold_for_the_run_only(tmp_path, monkeypatch):
    """trainer.cpu_threads applies while training and is undone afterwards (a caller's process,
    e.g. a benchmark or a test worker, keeps its own thread count)."""
    seen = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, _f=torch.optim.AdamW.step, **k:
                        (seen.append(torch.get_num_threads()), _f(self, *a, **k))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(make_cfg(tmp_path, "trainer.max_steps=2", "trainer.cpu_threads=2"))
        assert seen and set(seen) == {2}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("objective", ["flow_matching", "meanflow"])
def test_bf16_autocast_runs_and_is_off_for_jvp(tmp_path, objective, capfd):
    out = train(make_cfg(tmp_path, f"objective={objective}", "trainer.max_steps=3", "trainer.precision=bf16"))
    assert out["step"] == 3
    err = capfd.readouterr().err
    assert ("bf16 autocast is off" in err) == (objective == "meanflow")


@pytest.mark.parametrize("objective", ["meanflow", "tvm"])
def test_jvp_bf16_keeps_autocast_through_the_jvp(tmp_path, capfd, objective):
    """``trainer.jvp_bf16``: the JVP objective trains under autocast (no note that it is off), and
    its loss differs from the fp32 run's by bf16 rounding, not more (TVM also backpropagates
    through its bf16 JVP)."""
    fp32 = train(make_cfg(tmp_path / "fp32", f"objective={objective}", "trainer.max_steps=3"))
    capfd.readouterr()
    bf16 = train(make_cfg(tmp_path / "bf16", f"objective={objective}", "trainer.max_steps=3", "trainer.precision=bf16",
                          "trainer.jvp_bf16=true"))
    assert "bf16 autocast is off" not in capfd.readouterr().err
    assert bf16["step"] == 3

    def losses(run):
        lines = (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [rec["train/loss"] for rec in map(json.loads, lines) if "train/loss" in rec]
    a, b = losses(fp32), losses(bf16)
    assert len(a) == len(b) == 3 and a != b
    assert all(abs(x - y) < 0.05 * abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize("objective", [pytest.param("flow_matching", marks=pytest.mark.slow), "meanflow"])
def test_compile_keeps_checkpoints_and_results(tmp_path, objective, capfd):
    """``trainer.compile`` compiles the backbone in place: the checkpoint's tensor names are the
    eager run's, the trained weights agree within float32 kernel noise, and JVP objectives stay eager."""
    from torch._dynamo.utils import counters

    eager = train(make_cfg(tmp_path / "eager", f"objective={objective}", "trainer.max_steps=3"))
    counters.clear()
    compiled = train(make_cfg(tmp_path / "compiled", f"objective={objective}", "trainer.max_steps=3",
                              "trainer.compile=true"))
    assert eager["step"] == compiled["step"] == 3
    err = capfd.readouterr().err
    assert ("torch.compile is off" in err) == (objective == "meanflow")
    assert (counters["stats"]["unique_graphs"] > 0) == (objective != "meanflow")     # dynamo did (not) run
    assert max_diff(final_state(tmp_path / "eager"), final_state(tmp_path / "compiled")) < 1e-4


def test_native_bf16_detection_reads_cpu_flags(tmp_path):
    from jumpflow.trainer import native_bf16_cpu

    cases = {"flags\t\t: fpu avx2 avx512f avx512_bf16 sse\n": True,
             "flags\t\t: fpu avx2 avx512f avx512_vnni\n": False,
             "Features\t: fp asimd bf16 i8mm\n": True,
             "flags\t\t: fpu amx_tile amx_bf16\n": True}
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"cpuinfo{i}"
        path.write_text("processor\t: 0\n" + text)
        assert native_bf16_cpu(path) is expected, text
    assert native_bf16_cpu(tmp_path / "missing") is False


def test_debug_switch_and_run_directory(tmp_path):
    out = train(make_cfg(tmp_path, "debug=true", "trainer.max_steps=1000", "trainer.eval_every=0"))
    assert out["step"] == 6
    steps = sorted(int(p.stem.split("_")[1]) for p in checkpoint_paths(tmp_path / "checkpoints"))
    assert steps == [3, 6]
    cfg = (tmp_path / "config.yaml").read_text()
    assert "${" not in cfg and "max_steps: 6" in cfg          # resolved, with the debug values
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert any("eval/sliced_w2_nfe1" in r for r in records)
    assert {"train/lr", "train/grad_norm", "train/it_per_s"} <= set(records[0])


def test_each_objective_trains_through_the_loop(tmp_path):
    """Every registered objective runs two steps of the same loop and saves a checkpoint."""
    from jumpflow.objectives import OBJECTIVES

    for name in sorted(OBJECTIVES):
        extra = ["objective.gen_per_group=4"] if name == "drifting" else []
        extra += ["objective.head_width=16", "objective.head_depth=1"] if name == "transition_matching" else []
        out = train(make_cfg(tmp_path / name, f"objective={name}", "trainer.max_steps=2", *extra))
        assert out["step"] == 2, name
        assert torch.isfinite(torch.stack([v.float().sum() for v in final_state(tmp_path / name).values()])).all()


# ------------------------------------------------------------------ schedules, EMA, data order
def test_lr_warmup_then_cosine():
    f = {"warmup": 10, "total": 110, "schedule": "cosine", "min_ratio": 0.1}
    assert lr_factor(0, **f) == pytest.approx(0.1) and lr_factor(9, **f) == pytest.approx(1.0)
    assert lr_factor(10, **f) == pytest.approx(1.0)
    assert lr_factor(60, **f) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, **f) == pytest.approx(0.1) and lr_factor(500, **f) == pytest.approx(0.1)
    assert lr_factor(50, warmup=0, total=100, schedule="constant", min_ratio=0.0) == 1.0


def test_ema_decay_schedules():
    assert ema_decay(1, 0.999, None) == 0.999
    assert ema_decay(3, 0.999, None, update_after_step=5) == 0.0
    # Diffusion Policy: 1 - (1 + s)^-0.75 with s = step - 1, capped at the maximum
    assert ema_decay(1, 0.9999, 0.75) == 0.0
    assert ema_decay(11, 0.9999, 0.75) == pytest.approx(1 - 11 ** -0.75)
    assert ema_decay(10**9, 0.9999, 0.75) == 0.9999


def test_ema_is_swa_utils_average(tmp_path):
    """decay 0 keeps the EMA equal to the model; a constant decay lags behind it."""
    train(make_cfg(tmp_path / "a", "trainer.max_steps=3", "ema.decay=0.0"))
    s = final_state(tmp_path / "a")
    model, ema = unprefixed(s, "model"), unprefixed(s, "ema.module")
    assert max_diff(model, ema) == 0.0
    train(make_cfg(tmp_path / "b", "trainer.max_steps=3", "ema.decay=0.5"))
    s = final_state(tmp_path / "b")
    assert max_diff(unprefixed(s, "model"), unprefixed(s, "ema.module")) > 0
    assert int(s["ema.n_averaged"]) == 3


def test_global_batch_split_and_order():
    n, b = 100, 12
    whole = GlobalBatchSampler(n, b, 1, [0], seed=7)
    split = [GlobalBatchSampler(n, b, 4, [r], seed=7) for r in range(4)]
    it_whole, it_split = iter(whole), [iter(s) for s in split]
    seen = []
    for _ in range(20):                        # crosses epochs (8 batches per epoch)
        full = next(it_whole)
        parts = [x for it in it_split for x in next(it)]
        assert parts == full                   # the shards are contiguous slices of the global batch
        seen += [i for i, _ in full]
    assert sorted(seen[:96]) == sorted(set(seen[:96]))        # an epoch has no repeats
    late = iter(GlobalBatchSampler(n, b, 1, [0], seed=7, start_step=13))
    assert next(late) == list(iter_n(iter(whole), 14))[-1]    # resume continues the order
    other = next(iter(GlobalBatchSampler(n, b, 1, [0], seed=8)))
    assert other != next(iter(whole))


def iter_n(it, k):
    for _ in range(k):
        yield next(it)


# ------------------------------------------------------------------ CLI
def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_cli_help_and_cfg_job():
    """``--help`` and ``--cfg job`` answer without importing torch (the trainer is imported only
    when a run starts)."""
    def cli_importtime(*args):
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "jumpflow.cli.train", *args], env=ENV,
                              capture_output=True, text=True, timeout=120, check=False)

    out = cli_importtime("--help")
    assert out.returncode == 0 and "jumpflow-train" in out.stdout and "objective:" in out.stdout
    assert "hydra" in imported_modules(out.stderr) and "torch" not in imported_modules(out.stderr)
    out = cli_importtime("--cfg", "job", "objective=meanflow", "experiment=toy2d")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "jumpflow.objectives.MeanFlow" in out.stdout and "max_steps: 20000" in out.stdout
    assert "torch" not in imported_modules(out.stderr)


def test_cli_multirun(tmp_path):
    out = cli("-m", "objective=flow_matching,meanflow", f"hydra.sweep.dir={tmp_path}", *TINY,
              "trainer.max_steps=2", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for job, target in (("0", "FlowMatching"), ("1", "MeanFlow")):
        paths = checkpoint_paths(tmp_path / job / "checkpoints")
        assert paths and target in json.loads(paths[-1].read_text())["config"]["objective"]["_target_"]


@pytest.mark.slow
def test_toy2d_flow_matching_learns(tmp_path):
    """600 steps of the loop take the 2-D checkerboard from the untrained sampler's sliced W2
    (about 0.34) to well below it (16-step Euler, EMA weights)."""
    common = ["objective=flow_matching", "++backbone.width=64", "++backbone.depth=2", "trainer.batch_size=256",
              "task.n=20000", "trainer.eval_at_end=true", "task.eval_samples=1000", "task.eval_steps=[16]",
              "optim.warmup_steps=50"]
    out0 = train(make_cfg(tmp_path / "0", *common, "trainer.max_steps=1", "ema.enabled=false"))
    out = train(make_cfg(tmp_path / "1", *common, "trainer.max_steps=600", "ema.decay=0.99"))
    w0, w1 = out0["metrics"]["eval/sliced_w2_nfe16"], out["metrics"]["eval/sliced_w2_nfe16"]
    assert math.isfinite(w1) and w1 < 0.6 * w0, (w0, w1)
