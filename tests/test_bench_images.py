"""bench/images: the backbone every row shares composes into the trained model's config."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from bench.images import backbone_name, finalize, overrides_for, row_settings
from jumpflow.backbones import MLP, UNet2D
from jumpflow.config import validate_config


def bench_args(**kw) -> argparse.Namespace:
    args = argparse.Namespace(steps=10, batch=8, threads=1, lr=1e-3, warmup=1, ema=0.9, width=64, depth=2,
                              cond_dim=16, data_root="data", seed=0, prediction="data", override=[], backbone="mlp",
                              unet_size="S", enc_arch="convnet", enc_width=8, drift_gen=4, drift_blocks="location",
                              ckpt_every=0, resume=False)
    vars(args).update(kw)
    return args


@pytest.mark.parametrize("backbone, size, cls, name, width", [("mlp", "S", MLP, "MLP width 64 depth 2", None),
                                                              ("unet2d", "S", UNet2D, "UNet2D-S", 64),
                                                              ("unet2d", "XS", UNet2D, "UNet2D-XS", 32)])
@pytest.mark.parametrize("objective", ["meanflow", "drifting"])
def test_backbone_choice_builds_that_backbone(backbone, size, cls, name, width, objective):
    args = bench_args(backbone=backbone, unet_size=size)
    overrides = overrides_for(objective, args, Path("enc.safetensors"), Path("run"))
    with initialize_config_module("configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    validate_config(cfg)                                       # the typed schemas accept it
    net = instantiate(cfg.backbone)
    assert isinstance(net, cls) and backbone_name(args).startswith(name)
    if backbone == "unet2d":                                   # the registry's size, not the MLP's keys
        assert net.feature_dim == width and "width" not in cfg.backbone
    if objective == "drifting":
        assert cfg.objective.feature_map.per_location is True and cfg.objective.feature_map.kind == "convnet"


def test_a_row_records_its_guidance_and_its_part_s_overrides():
    """Parts with other ``--override`` lists merge into one result file, so each row names its own."""
    assert row_settings(bench_args(), None) == {}
    assert row_settings(bench_args(), 2.0) == {"guidance": 2.0}
    args = bench_args(override=["backbone.tokens=16"])
    assert row_settings(args, None) == {"overrides": ["backbone.tokens=16"]}
    row = row_settings(args, 1.5)
    assert row == {"guidance": 1.5, "overrides": ["backbone.tokens=16"]}
    row["overrides"].append("x")
    assert args.override == ["backbone.tokens=16"]                # a copy, not the parser's list


def test_finalize_gives_each_row_its_own_part_s_steps_and_batch(tmp_path):
    """Parts trained with other ``--steps`` merge into one file whose config keeps the first part's;
    each merged row names its own, and the merged table keeps every row."""
    import json

    def part(tag, objective, steps, batch, fid):
        row = {"dataset": "mnist", "objective": objective, "label": objective, "nfe": 1, "n_samples": 10,
               "fid": fid, "sec_per_step": 0.1}
        cfg = {"train": {"steps": steps, "batch": batch}, "elapsed_s": 1.0}
        # part "a" was copied from another bench (re-measured under a new name): the file is named by --bench
        name = "old" if tag == "a" else "b"
        (tmp_path / f"b.part-{tag}.json").write_text(json.dumps({"bench": name, "config": cfg, "rows": [row]}))

    part("a", "meanflow", 3000, 64, 0.6)
    part("d", "drifting", 1500, 32, 11.4)
    args = argparse.Namespace(out=str(tmp_path), bench="b", runs=str(tmp_path / "runs"), diversity=False,
                              n_inception=0)
    assert finalize(args) == 0
    merged = json.loads((tmp_path / "b.json").read_text())
    assert merged["bench"] == "b"
    rows = {r["objective"]: r for r in merged["rows"]}
    assert (rows["meanflow"]["steps"], rows["meanflow"]["batch"]) == (3000, 64)
    assert (rows["drifting"]["steps"], rows["drifting"]["batch"]) == (1500, 32)

    broken = tmp_path / "b.part-z.json"                   # a part without its train config: one line, no write
    broken.write_text(json.dumps({"bench": "b", "config": {}, "rows": []}))
    (tmp_path / "b.json").unlink()
    with pytest.raises(KeyError, match=r"b\.part-z\.json: no 'config\.train\.steps'"):
        finalize(args)
    assert not (tmp_path / "b.json").exists()


def test_inception_ratio_to_fm100_needs_the_same_sample_counts(tmp_path):
    """Small-sample Inception FID falls as the sample count grows (session 56: the real-vs-real floor
    25.1 at 250 samples, 11.2 at 1,000), so a row measured on other counts than the main table's Flow
    Matching-100 gets no ratio to it; the classifier-FID ratio (same count everywhere) stays."""
    import json

    fm100 = {"objective": "flow_matching", "nfe": 100, "fid": 4.0, "fid_inception": 200.0, "n_inception": 250}
    (tmp_path / "images.json").write_text(json.dumps({"bench": "images", "config": {}, "rows": [fm100]}))
    rows = [{"dataset": "mnist", "objective": "meanflow", "label": "mf", "nfe": 1, "n_samples": 10, "fid": 1.0,
             "fid_inception": 100.0, "n_inception": 1000, "n_inception_ref": 1000, "sec_per_step": 0.1},
            {"dataset": "mnist", "objective": "drifting", "label": "dr", "nfe": 1, "n_samples": 10, "fid": 2.0,
             "fid_inception": 50.0, "n_inception": 250, "sec_per_step": 0.1}]
    cfg = {"train": {"steps": 10, "batch": 8}, "elapsed_s": 1.0}
    (tmp_path / "c.part-a.json").write_text(json.dumps({"bench": "c", "config": cfg, "rows": rows}))
    args = argparse.Namespace(out=str(tmp_path), bench="c", runs=str(tmp_path / "runs"), diversity=False,
                              n_inception=0)
    assert finalize(args) == 0
    got = {r["objective"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert got["meanflow"]["fid_ratio_to_fm100"] == 0.25 and "fid_inception_ratio_to_fm100" not in got["meanflow"]
    assert got["drifting"]["fid_inception_ratio_to_fm100"] == 0.25


def test_importing_the_bench_scripts_leaves_the_environment_alone():
    """numba refuses a NUMBA_NUM_THREADS that changes after its pool started, so a bench module that set
    it at import broke the numba tests of whichever pytest worker imported it after its first parallel
    call (CI, 2026-12-05). Checked in a fresh interpreter so this worker's imports do not hide it."""
    code = (
        "import importlib, os, pathlib\n"
        "before = dict(os.environ)\n"
        "for f in sorted(pathlib.Path('bench').glob('*.py')):\n"
        "    importlib.import_module('bench.' + f.stem)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(changed)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    # without NUMBA_*: this worker imported bench.images at collection, and a setdefault would hide there
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("resume", [False, True])
def test_a_row_resumes_only_when_asked_and_then_counts_every_segment(tmp_path, monkeypatch, resume):
    """Without ``--resume`` a row's old run folder is removed and trained afresh; with it the
    folder is kept, the trainer gets ``resume=true``, and s/step is the trainer's training time
    over every segment, not this process's wall time."""
    import jumpflow.checkpoint
    import jumpflow.trainer
    from bench.images import train_row

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "marker").write_text("an earlier segment")
    seen = {}

    def fake_train(cfg):
        seen["ckpt_every"] = int(cfg.trainer.ckpt_every)
        seen["resume"] = bool(cfg.resume)
        seen["marker_kept"] = (run_dir / "checkpoints" / "marker").exists()
        return {"run_dir": str(cfg.run_dir), "step": 10, "train_seconds": 4321.0,
                "resumed_from_step": 600 if cfg.resume else 0}

    monkeypatch.setattr(jumpflow.trainer, "train", fake_train)
    monkeypatch.setattr(jumpflow.checkpoint, "load_model", lambda path: ("model", {}))
    args = bench_args(resume=resume, ckpt_every=4 if resume else 0)
    model, sec, resumed_from = train_row("meanflow", args, Path("enc.safetensors"), run_dir)
    # a run meant to span sessions checkpoints on the way; a fresh row only at its end
    assert model == "model" and seen == {"resume": resume, "marker_kept": resume, "ckpt_every": 4 if resume else 10}
    if resume:
        assert resumed_from == 600 and sec == pytest.approx(432.1)
    else:
        assert resumed_from == 0 and sec < 1.0


def test_a_negative_checkpoint_interval_is_refused_before_anything_is_written(tmp_path, capsys):
    """The trainer's schema would refuse it too, but only after the classifiers are trained and
    the encoder cache is written: the bench refuses it at parse time."""
    from bench.images import main

    out = tmp_path / "results"
    with pytest.raises(SystemExit):
        main(["--ckpt-every", "-1", "--out", str(out), "--runs", str(tmp_path / "runs")])
    assert "--ckpt-every: must be >= 0" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def fake_checkpoint(folder: Path, step: int = 3500, seconds: float = 7000.0, tensors: bool = True) -> Path:
    """A checkpoint written by the project's own writer (so it passes ``read_checkpoint``)."""
    import torch

    from jumpflow.checkpoint import save_checkpoint

    path = save_checkpoint(folder, step, {"w": torch.zeros(2)}, {"step": step, "train_seconds": seconds})
    if not tensors:
        path.with_suffix(".safetensors").unlink()
    return path


def test_a_scored_checkpoint_is_measured_as_it_is_with_its_own_step_and_time(tmp_path, monkeypatch):
    """``--score-checkpoint``: the row is the checkpoint's EMA model, nothing is trained, --steps
    becomes its step and s/step its recorded training time over that step."""
    import jumpflow.checkpoint
    import jumpflow.trainer
    from bench.images import checkpoint_step, train_row

    ckpt = fake_checkpoint(tmp_path / "keep")
    monkeypatch.setattr(jumpflow.trainer, "train", lambda cfg: pytest.fail("a scored checkpoint must not train"))
    monkeypatch.setattr(jumpflow.checkpoint, "load_model", lambda path: (f"model of {Path(path).name}", {}))
    args = bench_args(score_checkpoint=str(ckpt), objectives="meanflow", finalize=False)
    args.steps = checkpoint_step(argparse.ArgumentParser(), args)
    run_dir = tmp_path / "runs" / "t_meanflow"
    model, sec, resumed_from = train_row("meanflow", args, Path("enc.safetensors"), run_dir)
    assert (model, args.steps, resumed_from) == ("model of ckpt_000003500.json", 3500, 0)
    assert sec == pytest.approx(2.0) and not run_dir.exists()


@pytest.mark.parametrize("case, message", [
    ("two objectives", "one --objectives row"),
    ("with --resume", "one --objectives row"),
    ("not json", "is not a checkpoint's .json file"),
    ("missing", "is not a checkpoint's .json file"),
    ("no tensors", "is missing"),
    ("damaged tensors", "truncated or damaged"),
    ("not a checkpoint", "is unreadable"),
    ("step 0", "nothing trained to score"),
])
def test_a_checkpoint_that_cannot_be_scored_is_refused_before_anything_is_written(tmp_path, capsys, case, message):
    from bench.images import main

    ckpt = fake_checkpoint(tmp_path / "keep", step=0 if case == "step 0" else 3500, tensors=case != "no tensors")
    argv = ["--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--objectives", "meanflow"]
    if case == "two objectives":
        argv += ["--objectives", "meanflow,tvm"]
    if case == "with --resume":
        argv += ["--resume"]
    if case == "not json":
        ckpt = ckpt.with_suffix(".safetensors")
        ckpt.write_bytes(b"")
    if case == "missing":
        ckpt = tmp_path / "keep" / "ckpt_000009999.json"
    if case == "damaged tensors":
        ckpt.with_suffix(".safetensors").write_bytes(b"x")
    if case == "not a checkpoint":
        ckpt.write_text(json.dumps({"steps": 3500}))
    with pytest.raises(SystemExit):
        main(argv + ["--score-checkpoint", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--score-checkpoint" in err and message in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_the_guidance_plot_draws_each_unguided_baseline_once_whatever_the_number_of_swept_seeds(tmp_path,
                                                                                              monkeypatch):
    """Two swept variants (seeds) of one objective share its unguided row: one dashed level, not two
    overlapping ones coloured after whichever seed came last."""
    import matplotlib.pyplot as plt

    from bench.images import save_guidance_plot

    rows = [{"objective": "drifting", "label": f"drifting-G16-guided{s}-w{w}", "nfe": 1, "guidance": w,
             "fid": 10.0 - w} for s in ("", "-s1") for w in (1, 2, 4)]
    rows.append({"objective": "drifting", "label": "drifting-G16-unguided", "nfe": 1, "fid": 11.8})
    rows.append({"objective": "tvm", "label": "tvm", "nfe": 1, "fid": 5.0})       # not swept: not drawn
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    save_guidance_plot(rows, tmp_path / "g.png")
    ax = figures[0].axes[0]
    levels = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
    assert [line.get_ydata()[0] for line in levels] == [11.8]
    assert sorted(line.get_label() for line in ax.get_lines() if line not in levels) == [
        "drifting-G16-guided 1 NFE", "drifting-G16-guided-s1 1 NFE"]
    assert (tmp_path / "g.png").stat().st_size > 0
