"""Scale-out: two CPU processes under torchrun (gloo), each computing half of the global batch,
give the parameters of one process computing the whole batch (as two micro-batches).

The objective's noise is seeded per shard of the global batch and the data order per step, so
the split over processes changes nothing but the floating-point summation of gradients. The
JVP objectives run on the bare module (no DDP wrapper); gradients are all-reduced by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.checkpoint import checkpoint_paths, read_checkpoint
from jumpflow.trainer import train

TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "trainer.batch_size=32", "trainer.log_every=1",
        "optim.warmup_steps=2", "optim.lr=1e-3", "ema.decay=0.9", "trainer.eval_every=0", "trainer.eval_at_end=false",
        "task.conditional=true", "task.cond_dim=8", "trainer.max_steps=6", "trainer.ckpt_every=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def final(run_dir) -> dict[str, torch.Tensor]:
    tensors, meta = read_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])
    assert meta["step"] == 6
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


@pytest.mark.parametrize("objective", ["flow_matching", "meanflow"])
def test_two_processes_equal_one_process(tmp_path, objective):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [f"objective={objective}", *TINY]
    with initialize_config_module("jumpflow.configs", version_base=None):
        train(compose("train", overrides=[f"run_dir={one}", "trainer.grad_accum=2", *args]))
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "jumpflow.cli.train", f"hydra.run.dir={two}", *args],
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert dist.returncode == 0, dist.stderr[-3000:]
    _, meta = read_checkpoint(checkpoint_paths(two / "checkpoints")[-1])
    assert meta["world_size"] == 2
    a, b = final(one), final(two)
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    print(f"{objective}: max |one - two| = {diff:.3g}")
    assert diff <= 1e-5, diff
    # and the run really moved: the parameters differ from the initial ones by far more than that
    assert float((a["model.backbone.inp.weight"] - a["ema.module.backbone.inp.weight"]).abs().max()) > 1e-4
