"""Scale-out: CPU processes under torchrun (gloo) give the parameters of one process that
computes the same global batch as micro-batches (``grad_accum``).

The objective's noise is seeded per shard of the global batch and the data order per step, so
the split over processes changes nothing but the floating-point summation of gradients. Under
torchrun the trainer wraps the loss module (the generator whose forward is the objective's
loss, JVPs included) in DDP, or shards it with FSDP's ``fully_shard`` (``+trainer.parallel=fsdp``).
Drifting's field couples the samples of a batch: it is taken over the global batch (gathered
across processes and micro-batches), which float64 unit tests check against the field of the
whole batch at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.checkpoint import checkpoint_paths, read_checkpoint
from jumpflow.config import ConfigError, validate_config
from jumpflow.drift import drift_field
from jumpflow.objectives import drifting as drifting_module
from jumpflow.objectives.drifting import Drifting, merge_shards
from jumpflow.trainer import train

TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "trainer.batch_size=32", "trainer.log_every=1",
        "optim.warmup_steps=2", "optim.lr=1e-3", "ema.decay=0.9", "trainer.eval_every=0", "trainer.eval_at_end=false",
        "task.conditional=true", "task.cond_dim=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def one_process(run_dir, *overrides):
    with initialize_config_module("jumpflow.configs", version_base=None):
        train(compose("train", overrides=[f"run_dir={run_dir}", *TINY, *overrides]))


def two_processes(run_dir, *overrides, timeout=300):
    proc = subprocess.run([*TORCHRUN, "-m", "jumpflow.cli.train", f"hydra.run.dir={run_dir}", *TINY, *overrides],
                          env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final(run_dir, step: int) -> dict[str, torch.Tensor]:
    tensors, meta = read_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])
    assert meta["step"] == step
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``): torchrun's workers run in their own sessions."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


# ------------------------------------------------------------------ DDP: 2 processes == 1 process
# MeanFlow (a JVP inside DDP's forward) and Drifting (the gathered field) run by default; Flow
# Matching and TVM (EMA target in net.aux) under -m slow: each is a torchrun of ~15 s on 2 cores
@pytest.mark.parametrize("objective", [pytest.param("flow_matching", marks=pytest.mark.slow), "meanflow",
                                       pytest.param("tvm", marks=pytest.mark.slow), "drifting"])
def test_ddp_two_processes_equal_one_process(tmp_path, objective, monkeypatch):
    """DDP over the loss module (JVPs inside DDP's forward; TVM's EMA target in ``net.aux``):
    2 processes x 1 micro-batch end with the parameters (model and EMA) of 1 process x 2
    micro-batches. Drifting's field is over the global batch, so it is equal too, and it
    differs from the per-shard field of the old trainer (the gathering matters)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [f"objective={objective}", "trainer.max_steps=6", "trainer.ckpt_every=0"]
    one_process(one, "trainer.grad_accum=2", *args)
    two_processes(two, *args)
    _, meta = read_checkpoint(checkpoint_paths(two / "checkpoints")[-1])
    assert meta["world_size"] == 2
    a, b = final(one, 6), final(two, 6)
    diff = max_diff(a, b)
    print(f"{objective}: max |one - two| = {diff:.3g}")
    assert diff <= 1e-6, diff
    # the run really moved: the parameters differ from their EMA by far more than that
    assert float((a["model.backbone.inp.weight"] - a["ema.module.backbone.inp.weight"]).abs().max()) > 1e-4
    if objective == "drifting":                      # each shard's own field (the old behaviour) differs
        monkeypatch.setattr(Drifting, "couples_shards", False)
        one_process(tmp_path / "per_shard", "trainer.grad_accum=2", *args)
        assert max_diff(final(tmp_path / "per_shard", 6), b) > 1e-4


@pytest.mark.parametrize("objective", ["drifting", pytest.param("meanflow", marks=pytest.mark.slow)])
def test_ddp_gradient_accumulation_no_sync(tmp_path, objective):
    """2 processes x 2 micro-batches (``no_sync`` on the first; for Drifting a no-grad prepass
    records the micro-batches for the global field) == 1 process x 4 micro-batches."""
    args = [f"objective={objective}", "trainer.max_steps=4", "trainer.ckpt_every=0"]
    one_process(tmp_path / "one", "trainer.grad_accum=4", *args)
    two_processes(tmp_path / "two", "trainer.grad_accum=2", *args)
    diff = max_diff(final(tmp_path / "one", 4), final(tmp_path / "two", 4))
    print(f"{objective}: max |1 x 4 - 2 x 2| = {diff:.3g}")
    assert diff <= 1e-6, diff


@pytest.mark.slow          # 30 s; the one-process kill -9 test (test_trainer.py) runs by default
def test_kill9_then_resume_under_two_processes(tmp_path):
    """torchrun (2 processes, DDP, MeanFlow) killed with SIGKILL, the agent and both workers,
    right after its first checkpoint, then resumed under torchrun: the parameters (model and
    EMA) of an uninterrupted run."""
    steps = 60
    common = ["objective=meanflow", f"trainer.max_steps={steps}", "ema.power=0.75", "ema.decay=0.999"]
    one_process(tmp_path / "ref", "trainer.grad_accum=2", *common, "trainer.ckpt_every=0")
    run_dir = tmp_path / "killed"
    args = [*TORCHRUN, "-m", "jumpflow.cli.train", f"hydra.run.dir={run_dir}", *TINY, *common, "trainer.ckpt_every=10"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    tree = []
    try:
        while not checkpoint_paths(run_dir / "checkpoints"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
        tree = process_tree(proc.pid)                  # torchrun's agent and its two workers
        for pid in reversed(tree):
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(tree) >= 3
    while any(alive(pid) for pid in tree):
        assert time.time() < deadline, "workers outlived SIGKILL"
        time.sleep(0.02)
    done = [int(p.stem.split("_")[1]) for p in checkpoint_paths(run_dir / "checkpoints")]
    assert max(done) < steps, "the run finished before it was killed"
    resumed = subprocess.run([*args, "resume=true"], env=ENV, capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {max(done)}" in resumed.stderr, resumed.stderr[-1500:]
    diff = max_diff(final(run_dir, steps), final(tmp_path / "ref", steps))
    print(f"killed at checkpoint {max(done)}; max |resumed (2 processes) - uninterrupted (1)| = {diff:.3g}")
    assert diff <= 1e-6, diff


# ------------------------------------------------------------------ FSDP (fully_shard on CPU with gloo)
def _fsdp_run_and_resume(tmp_path, objective: str) -> None:
    ref, run = tmp_path / "ref", tmp_path / "fsdp"
    common = [f"objective={objective}", "trainer.keep_checkpoints=3", "trainer.max_steps=6", "trainer.ckpt_every=3"]
    one_process(ref, "trainer.grad_accum=2", *common)
    two_processes(run, "+trainer.parallel=fsdp", *common)
    # the checkpoints hold full tensors, as one process writes them
    for at in (3, 6):
        t_ref, m_ref = read_checkpoint(ref / "checkpoints" / f"ckpt_{at:09d}.json")
        t_run, m_run = read_checkpoint(run / "checkpoints" / f"ckpt_{at:09d}.json")
        assert m_run["world_size"] == 2 and m_run["optimizer"] == m_ref["optimizer"]
        assert t_ref.keys() == t_run.keys()
        assert all(t_ref[k].shape == t_run[k].shape and t_ref[k].dtype == t_run[k].dtype for k in t_ref)
        diff = max(float((t_ref[k].double() - t_run[k].double()).abs().max())
                   for k in t_ref if k.startswith(("model.", "ema.", "optim.")) and t_ref[k].numel())
        print(f"{objective}: FSDP vs one process at step {at} (model, EMA, AdamW moments): {diff:.3g}")
        assert diff <= 1e-6, (at, diff)
    uninterrupted = final(run, 6)
    for suffix in (".json", ".safetensors"):                     # back to step 3, then resume under FSDP
        (run / "checkpoints" / f"ckpt_{6:09d}{suffix}").unlink()
    proc = two_processes(run, "+trainer.parallel=fsdp", *common, "resume=true")
    assert "at step 3" in proc.stderr
    diff = max_diff(final(run, 6), uninterrupted)
    print(f"{objective}: FSDP resumed from step 3 vs uninterrupted: {diff:.3g}")
    assert diff <= 1e-7, diff


@pytest.mark.slow          # 32 s: two torchruns and a reference run
def test_fsdp_equals_one_process_and_resumes(tmp_path):
    """``+trainer.parallel=fsdp`` (``fully_shard`` per MLP block and on the loss module, MeanFlow's
    JVP through the sharded module): 2 processes equal 1 process x 2 micro-batches within 1e-6;
    the checkpoint is the full state (same keys, shapes and values as one process's); a
    2-process FSDP run resumed from it ends where the uninterrupted one does."""
    _fsdp_run_and_resume(tmp_path, "meanflow")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tvm", "drifting", "flow_matching"])
def test_fsdp_other_objectives(tmp_path, objective):
    """As above for TVM (EMA target sharded alongside the backbone), Drifting (global field,
    gathered features) and Flow Matching."""
    _fsdp_run_and_resume(tmp_path, objective)


# ------------------------------------------------------------------ collectives
GATHER_SCRIPT = textwrap.dedent('''
    import torch, torch.distributed as dist
    from jumpflow.distributed import all_gather_payloads
    dist.init_process_group("gloo")
    r = dist.get_rank()
    def payload(shard):                      # first dimension varies with the shard, dtype per key
        n = 1 + 2 * shard
        return {"a": torch.arange(n * 6, dtype=torch.float64).reshape(n, 2, 3) + 100 * shard,
                "b": torch.full((shard % 2 * 3,), shard, dtype=torch.long)}
    got = all_gather_payloads([payload(2 * r), payload(2 * r + 1)])
    assert len(got) == 4
    for s, p in enumerate(got):
        want = payload(s)
        assert p.keys() == want.keys()
        for k in want:
            assert p[k].dtype == want[k].dtype and torch.equal(p[k], want[k]), (r, s, k)
    print("ok", r)
    dist.destroy_process_group()
''')


@pytest.mark.slow          # the DDP Drifting test above goes through the same gather
def test_all_gather_payloads_of_varying_sizes(tmp_path):
    """The gather that Drifting's global field uses: 2 processes x 2 dicts whose tensors differ
    in their first dimension (zero rows included) come back whole, in shard order, dtypes kept."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    proc = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2


def test_parallel_option_is_validated():
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=/nonexistent", "+trainer.parallel=zero3"])
    with pytest.raises(ConfigError, match=r"trainer\.parallel: must be one of ddp, fsdp"):
        validate_config(cfg)


# ------------------------------------------------------------------ Drifting's global field (float64)
def _classes(n: int, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, C)`` one-hot conditions of random labels, every class present."""
    labels = torch.cat([torch.arange(n_classes), torch.randint(n_classes, (n - n_classes,), generator=gen)])
    return torch.nn.functional.one_hot(labels[torch.randperm(n, generator=gen)], n_classes).double()


def _identity_net(z, t, h, cond):
    return 0.5 * z + (0.0 if cond is None else cond[:, :z.shape[1]])


def _shard(obj: Drifting, x: torch.Tensor, cond: torch.Tensor | None, seed: int) -> dict:
    """One shard's payload as ``Drifting.loss`` builds it (generated samples from its noise)."""
    torch.manual_seed(seed)
    _, mask, group_cond, row_group = obj._grouping(x, cond)
    n_groups, p = mask.shape
    g = obj.gen_per_group or p
    alpha = None if obj.alpha_sampler is None else obj.alpha_sampler(n_groups)
    noise = torch.randn((n_groups * g, *x.shape[1:]), dtype=x.dtype)
    gen_cond = None if group_cond is None else group_cond.repeat_interleave(g, 0)
    x_gen = _identity_net(noise, None, None, gen_cond)
    return obj.shard_payload(None, x, [x_gen], group_cond, row_group, alpha, g)


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("n_uncond_neg", [0, 3])
def test_gathered_field_equals_the_whole_batch_field(impl, n_uncond_neg):
    """Two shards, every class in both: the field each shard computes for its own generated
    samples from the gathered set equals the field of the whole batch computed at once
    (each class: both shards' positives, both shards' generated samples and unconditional
    negatives, one distance scale and one rms over everything), float64, both kernels."""
    gen = torch.Generator().manual_seed(0)
    obj = Drifting(gen_per_group=4, n_uncond_neg=n_uncond_neg, uncond_weight=0.7, kernel=impl)
    n_classes, d = 3, 2
    xs = [torch.randn(9, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    conds = [_classes(9, n_classes, gen) for _ in range(2)]
    parts = [_shard(obj, x, c, seed=s) for s, (x, c) in enumerate(zip(xs, conds))]
    got = torch.cat([obj.global_drift_field(parts, own)[0] for own in range(2)])     # (2 * 3 * 4, d)

    # the whole batch, assembled by hand: class k = shard 0's rows / samples, then shard 1's; classes
    # (and each shard's local groups) in the order of torch.unique over the condition rows
    labels = torch.unique(torch.cat(conds), dim=0, return_inverse=True)[1].split(9)
    pos = [torch.cat([x[lab == k] for x, lab in zip(xs, labels)]) for k in range(n_classes)]
    p_max = max(len(q) for q in pos)
    pos_pad = torch.zeros(n_classes, p_max, d, dtype=torch.float64)
    pos_mask = torch.zeros(n_classes, p_max, dtype=torch.bool)
    for k, q in enumerate(pos):
        pos_pad[k, :len(q)], pos_mask[k, :len(q)] = q, True
    g_of = [p["gen.0"].reshape(n_classes, 4, d) for p in parts]                 # local groups sorted by class
    gen_whole = torch.cat(g_of, 1)                                              # (3, 8, d)
    neg = None
    if n_uncond_neg:
        neg = torch.cat([p["neg.0"].reshape(n_classes, n_uncond_neg, d) for p in parts], 1)   # (3, 6, d)
    v = drift_field(gen_whole, pos_pad, pos_mask, neg, 0.7, obj.temperatures, impl=impl)   # (3, 8, d)
    want = torch.cat([v[:, :4].reshape(-1, d), v[:, 4:].reshape(-1, d)])
    err = float((got - want).abs().max())
    assert err <= 1e-12 * float(want.abs().max()), err
    assert float(want.abs().max()) > 0.1


def test_gathered_layout_with_guidance_scales_and_a_missing_class():
    """With a guidance scale per group, generated samples of one class made at different
    scales are different groups; each borrows every positive of its class; a class that one
    shard lacks is a smaller group (masked); the negatives' weight is (alpha - 1)(G - 1) / U."""
    gen = torch.Generator().manual_seed(1)
    obj = Drifting(gen_per_group=2, n_uncond_neg=2, guidance_alpha={"low": 1.0, "high": 4.0, "power": 1.0})
    x0, x1 = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    c0 = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).double()
    c1 = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), 3).double()       # no class 2
    parts = [_shard(obj, x0, c0, seed=0), _shard(obj, x1, c1, seed=1)]
    layout = merge_shards(parts, 1, "cond", conditional=True)
    assert layout.n_groups == 5                                  # 3 + 2 local groups, all scales distinct
    assert layout.gen_count.tolist() == [2] * 5 and layout.neg_count.tolist() == [2] * 5
    rows_of_class = {0: 4, 1: 4, 2: 2}                           # positives: both shards' rows of the class
    cond = torch.cat([p["cond"] for p in parts])
    for grp in range(layout.n_groups):
        local = (layout.group_alpha[grp] == torch.cat([p["alpha"] for p in parts])).nonzero()[0, 0]
        assert int(layout.pos_mask[grp].sum()) == rows_of_class[int(cond[local].argmax())]
    v = obj.global_drift_field(parts, 1)[0]
    assert v.shape == (4, 2) and torch.isfinite(v).all()

    same = Drifting(gen_per_group=2, n_uncond_neg=2, uncond_weight=1.0)            # no scales: classes merge
    parts = [_shard(same, x0, c0, seed=0), _shard(same, x1, c1, seed=1)]
    layout = merge_shards(parts, 0, "cond", conditional=True)
    assert layout.n_groups == 3 and sorted(layout.gen_count.tolist()) == [2, 4, 4]
    assert layout.gen_mask.shape == (3, 4)
    assert layout.pos_mask.sum(1).tolist() == layout.gen_count.tolist()       # 2 rows and 2 samples per class and shard
    assert (layout.neg_count == layout.gen_count).all()


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_masked_groups_equal_unpadded_groups(impl):
    """Groups of unequal sizes padded with ``gen_mask`` / ``neg_mask`` have the field each group
    has alone (per-group scale, no rms coupling), and the padded rows a field of 0; numba and
    torch agree."""
    gen = torch.Generator().manual_seed(2)
    sizes = [(3, 4, 2), (5, 2, 0), (2, 3, 3)]                    # (G, P, U) per group
    d = 3
    groups = [(torch.randn(g, d, generator=gen, dtype=torch.float64), torch.randn(p, d, generator=gen, dtype=torch.float64),
               torch.randn(u, d, generator=gen, dtype=torch.float64)) for g, p, u in sizes]
    g_max, p_max, u_max = (max(s[i] for s in sizes) for i in range(3))
    gen_pad = torch.zeros(3, g_max, d, dtype=torch.float64)
    pos_pad = torch.zeros(3, p_max, d, dtype=torch.float64)
    neg_pad = torch.zeros(3, u_max, d, dtype=torch.float64)
    gm, pm, nm = (torch.zeros(3, n, dtype=torch.bool) for n in (g_max, p_max, u_max))
    for k, (a, b, c) in enumerate(groups):
        gen_pad[k, :len(a)], pos_pad[k, :len(b)], neg_pad[k, :len(c)] = a, b, c
        gm[k, :len(a)], pm[k, :len(b)], nm[k, :len(c)] = True, True, True
    opts = {"temperatures": (0.05, 0.2), "scale": "group", "normalize": False, "impl": impl}
    v = drift_field(gen_pad + 7.0 * ~gm[..., None], pos_pad, pm, neg_pad - 5.0 * ~nm[..., None], 0.6,
                    gen_mask=gm, neg_mask=nm, **opts)            # padding far away: it must not count
    for k, (a, b, c) in enumerate(groups):
        alone = drift_field(a[None], b[None], None, c[None] if len(c) else None, 0.6, **opts)[0]
        assert torch.allclose(v[k, :len(a)], alone, rtol=1e-12, atol=1e-12), k
        assert not v[k, len(a):].any()
    other = drift_field(gen_pad, pos_pad, pm, neg_pad, 0.6, gen_mask=gm, neg_mask=nm,
                        impl="torch" if impl == "numba" else "numba", temperatures=(0.05, 0.2))
    assert torch.allclose(drift_field(gen_pad, pos_pad, pm, neg_pad, 0.6, gen_mask=gm, neg_mask=nm, impl=impl,
                                      temperatures=(0.05, 0.2)), other, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", [
    {"group_by": "cond", "n_uncond_neg": 2},
    {"group_by": "cond", "n_uncond_neg": 2, "guidance_alpha": {"no_guidance_frac": 0.5}},
    {"group_by": "sample", "gen_per_group": 3},
    {"group_by": "cond", "unconditional": True},
])
def test_one_shard_global_path_is_the_local_loss(monkeypatch, config):
    """The global path given only its own shard is the single-process loss (float64): same
    groups, positives, negatives, weights, distance scale and rms."""
    config = dict(config)
    unconditional = config.pop("unconditional", False)
    obj = Drifting(**{"gen_per_group": 4, **config})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    cond = None if unconditional else _classes(10, 3, gen)
    torch.manual_seed(5)
    local = obj.loss(_identity_net, x, cond)
    monkeypatch.setattr(drifting_module, "current_shards", lambda: object())
    monkeypatch.setattr(drifting_module, "gather_shards", lambda payload: ([payload], 0))
    torch.manual_seed(5)
    glob = obj.loss(_identity_net, x, cond)
    assert glob.loss.shape == local.loss.shape
    assert torch.allclose(glob.loss, local.loss, rtol=1e-12, atol=1e-15)
    assert float(local.loss.max()) > 0.0
