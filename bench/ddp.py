"""Scale-out: step time of DDP over the loss module (the trainer's default under torchrun)
against the hand-written gradient all-reduce it replaced, 2 processes on this machine (gloo),
1 thread per process, the main job's backbone (MLP width 512, depth 4, 5.1 M parameters) on
112-dimensional samples (the 16 x 7 action chunk's size) with a class condition.

Modes, each on its own copy of the model (same initialisation, same batches and seeds), run in
interleaved blocks so that background load hits them alike:

* ``allreduce``: the loss on the bare module, backward, then the pre-issue-20 trainer's
  ``allreduce_grads`` (flatten into 32 MB buckets, ``all_reduce``, copy back) after the backward.
* ``ddp``: ``DistributedDataParallel(LossModule(generator))`` as the trainer builds it
  (``find_unused_parameters=True``): buckets all-reduced while the backward pass still runs.
* ``ddp_static``: the same with ``find_unused_parameters=False``, to show what the graph walk
  costs (the trainer keeps it on, see ``jumpflow.distributed``).

A step is zero_grad, forward, backward, gradient synchronisation, clipping and AdamW; data
loading is excluded (fixed batches). ``sec_per_step`` is the median over the timed steps;
``max_param_diff`` compares each mode's parameters after all steps with ``allreduce``'s.

    python -m bench.ddp --steps 300 --objectives flow_matching,meanflow
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from torch import nn
from torch.utils.data import default_collate

from bench.common import arg_parser, parse_args, write_results
from jumpflow.build import build_components
from jumpflow.distributed import LossModule, wrap_ddp
from jumpflow.trainer import mix_seed, seed_everything

MODES = ("allreduce", "ddp", "ddp_static")


def allreduce_grads(params: list[nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
    """The trainer's gradient synchronisation before issue 20, kept here for the comparison:
    sum gradients over ranks after the backward pass (losses pre-divided by the world size)."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has)
    grads = []
    for p, n in zip(params, has.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def _cfg(objective: str, width: int, depth: int):
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        return compose("train", overrides=[
            f"objective={objective}", "backbone=mlp", f"++backbone.width={width}", f"++backbone.depth={depth}",
            "task=fake", "task.shape=[7,4,4]", "task.num_classes=10", "task.cond_dim=64", "task.fake_size=1024",
            "run_dir=/nonexistent", "logger=none"])


class Replica:
    """One mode's model, engine and optimiser."""

    def __init__(self, mode: str, cfg, device: torch.device):
        seed_everything(0)
        parts = build_components(cfg)
        self.mode, self.model, self.objective = mode, parts.model.to(device), parts.objective
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            dist.broadcast(t.data, 0)
        self.loss_module = LossModule(self.model)
        if mode == "ddp":
            self.engine = wrap_ddp(self.loss_module, device)
        elif mode == "ddp_static":
            self.engine = wrap_ddp(self.loss_module, device, find_unused_parameters=False)
        else:
            self.engine = self.loss_module
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.times: list[float] = []

    def step(self, batch, seed: int, world: int) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss, _ = self.engine(batch)
        if self.mode == "allreduce":
            (loss / world).backward()
            allreduce_grads(self.params)
        else:
            loss.backward()                                  # DDP averages over processes
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.objective.on_step_end(self.model)
        self.times.append(time.perf_counter() - t0)


def worker(args) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    for objective in args.objectives.split(","):
        cfg = _cfg(objective, args.width, args.depth)
        replicas = {mode: Replica(mode, cfg, device) for mode in MODES}
        data = build_components(cfg).task.train_dataset()
        n_params = sum(p.numel() for p in replicas["ddp"].params)
        per = args.batch // world

        def batch_of(step: int, data=data, per=per):
            gen = torch.Generator().manual_seed(mix_seed(0, step))
            idx = torch.randperm(len(data), generator=gen)[:args.batch].tolist()[rank * per:(rank + 1) * per]
            return default_collate([data[i] for i in idx])

        warm, block = args.warmup, args.block
        total = warm + args.steps
        step = 0
        while step < total:
            n = warm if step == 0 else min(block, total - step)
            batches = [batch_of(step + k) for k in range(n)]
            for mode in MODES:
                dist.barrier()
                for k, batch in enumerate(batches):
                    replicas[mode].step(batch, mix_seed(0, step + k, rank), world)
            step += n
        ref = dict(replicas["allreduce"].model.named_parameters())
        for mode in MODES:
            times = torch.tensor(replicas[mode].times[warm:], dtype=torch.float64)
            t = torch.stack([times.median(), times.mean()])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)                # the slower process sets the pace
            diff = max(float((p.detach() - ref[name].detach()).abs().max())
                       for name, p in replicas[mode].model.named_parameters())
            rows.append({"objective": objective, "mode": mode, "backend": dist.get_backend(), "processes": world,
                         "threads_per_process": args.threads, "params": n_params, "batch_per_process": per,
                         "steps": args.steps, "sec_per_step": round(float(t[0]), 5),
                         "sec_per_step_mean": round(float(t[1]), 5), "max_param_diff": diff})
        base = next(r["sec_per_step"] for r in rows if r["objective"] == objective and r["mode"] == "allreduce")
        for r in rows:
            if r["objective"] == objective:
                r["vs_allreduce"] = round(r["sec_per_step"] / base, 3)
        if rank == 0:
            for r in rows[-len(MODES):]:
                print(f"{objective} {r['mode']}: {r['sec_per_step'] * 1e3:.1f} ms / step", flush=True)
        del replicas
    if rank == 0:
        write_results("ddp", {"steps": args.steps, "warmup": args.warmup, "block": args.block,
                              "batch_global": args.batch, "backbone": f"MLP width {args.width} depth {args.depth}",
                              "sample": "112 values (7x4x4; the 16x7 chunk's size), class condition (10 classes)",
                              "load_before": os.getloadavg()[0], "note": "median step time, slower process; "
                              "vs_allreduce = sec_per_step / allreduce's"}, rows)
    dist.destroy_process_group()


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--objectives", default="flow_matching,meanflow")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--block", type=int, default=25, help="steps per mode before switching to the next")
    ap.add_argument("--batch", type=int, default=256, help="global batch (split over the processes)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse_hidden())
    args = parse_args(ap, argv)
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "bench.ddp", "--worker", *(argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sys.exit(subprocess.run(cmd, env=env, check=False).returncode)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
