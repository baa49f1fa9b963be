"""The one training loop, for toy data, images and policies alike.

Methods differ only in the ``objective`` config, workloads only in the ``task`` config,
networks only in the ``backbone`` config. One step::

    for each of the grad_accum micro-batches of this rank's share of the global batch:
        seed the noise RNG from (seed, step, shard)        # shard = rank * grad_accum + micro
        loss, metrics = engine(batch)                      # engine: DDP(LossModule(model)) under torchrun
        (loss / grad_accum).backward()                     # (bf16 autocast unless the objective uses JVPs)
                                                           # DDP averages over ranks; no_sync on all but
                                                           # the last micro-batch
    clip, AdamW step, warm-up + cosine LR, objective.on_step_end(model), EMA update

Under ``torchrun`` the loss module (``jumpflow.distributed.LossModule``: the generator whose
``forward(batch)`` is the objective's loss) is wrapped by ``DistributedDataParallel``, so the
JVP objectives run inside DDP's forward; ``trainer.parallel=fsdp`` shards it with
``fully_shard`` instead (checkpoints gather the full state on save and shard it back on load).
An objective whose loss couples the samples of the batch (``couples_shards``: Drifting's field)
sees every shard of the global batch (``jumpflow.distributed.gather_shards``).

Determinism: the seed fixes initialisation, the data order (a ``torch.Generator`` seeded
from (seed, epoch) permutes the dataset; the global batch of step ``k`` is a fixed slice of
it, split in contiguous shards), per-item augmentation RNG (seeded from (seed, epoch,
index)) and the objective's noise (seeded per shard). So a run gives the same parameters
whether its global batch is computed by one process (``grad_accum = S``) or by ``S``
processes under ``torchrun``, and ``resume=true`` continues exactly.

Errors in the configuration (values, or constructors of the task, backbone and objective)
raise :class:`jumpflow.config.ConfigError` before anything is written or trained.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from jumpflow.build import build_components
from jumpflow.checkpoint import (
    CheckpointError,
    collect_state,
    gather_full_state,
    latest_valid_checkpoint,
    read_checkpoint,
    restore_state,
    save_checkpoint,
)
from jumpflow.config import ConfigError, validate_config
from jumpflow.distributed import (
    LossModule,
    ShardPayload,
    ShardSet,
    comm_device,
    fsdp_shard,
    set_gradient_sync,
    shard_scope,
    wrap_ddp,
)

_MASK = (1 << 63) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): distinct tuples, unrelated streams."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & _MASK


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ data
class GlobalBatchSampler:
    """Yields, forever from ``start_step``, this process's micro-batches as lists of
    ``(index, item_seed)``.

    Epoch ``e`` is a permutation of the dataset drawn by a ``torch.Generator`` seeded with
    ``mix_seed(seed, e)``; step ``k`` takes the global batch ``perm[p * B:(p + 1) * B]``
    (``e, p = divmod(k, N // B)``; the incomplete tail of an epoch is dropped) and splits it
    into ``shards`` contiguous slices of ``B / shards``; this process gets ``shard_ids``.
    The data position is therefore a function of the step alone (saved as ``epoch``,
    ``batch_in_epoch``)."""

    def __init__(self, n: int, batch_size: int, shards: int, shard_ids: list[int], seed: int, start_step: int = 0):
        if batch_size > n:
            raise ConfigError("trainer.batch_size", f"{batch_size} is larger than the dataset ({n} items)")
        if batch_size % shards:
            raise ConfigError("trainer.batch_size", f"{batch_size} is not divisible by world_size * grad_accum "
                                                    f"= {shards}")
        self.n, self.batch_size, self.shards, self.shard_ids = n, batch_size, shards, list(shard_ids)
        self.seed, self.start_step = seed, start_step
        self.batches_per_epoch = n // batch_size

    def position(self, step: int) -> dict:
        epoch, pos = divmod(step, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": pos, "step": step}

    def generator(self, epoch: int) -> torch.Generator:
        """The generator that permutes epoch ``epoch`` (its state is saved in checkpoints)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator(epoch))

    def __iter__(self):
        step, cached = self.start_step, (None, None)
        per_shard = self.batch_size // self.shards
        while True:
            epoch, pos = divmod(step, self.batches_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.permutation(epoch).tolist())
            batch = cached[1][pos * self.batch_size:(pos + 1) * self.batch_size]
            for s in self.shard_ids:
                idx = batch[s * per_shard:(s + 1) * per_shard]
                yield [(i, mix_seed(self.seed, epoch, i, 0x17E5)) for i in idx]
            step += 1


def seed_cpu_rngs(seed: int) -> None:
    """Seed python, numpy and torch's CPU generator only. ``torch.manual_seed`` also seeds every
    accelerator backend lazily, which formats a stack trace per call (64 us here): per item of
    a 256 batch that was a tenth of a main-job training step."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


class ItemSeeded(Dataset):
    """``dataset[(index, seed)]``: seeds python / numpy / torch CPU RNGs, then returns ``dataset[index]``,
    so random augmentation is a function of the item's seed (any worker, any resume)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        seed_cpu_rngs(seed)
        return self.base[index]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ------------------------------------------------------------------------------ schedules
def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, decay: float, power: float | None, inv_gamma: float = 1.0, min_decay: float = 0.0,
              update_after_step: int = 0) -> float:
    """EMA decay for the update after optimiser step ``step`` (1-based).

    ``power = None``: constant ``decay``. Otherwise Diffusion Policy's warm-up
    ``1 - (1 + s / inv_gamma) ** -power`` with ``s = step - update_after_step - 1``, clamped to
    ``[min_decay, decay]``. Up to ``update_after_step`` the EMA copies the model (decay 0)."""
    if step <= update_after_step:
        return 0.0
    if power is None:
        return decay
    s = max(0, step - update_after_step - 1)
    return float(min(decay, max(min_decay, 1.0 - (1.0 + s / inv_gamma) ** -power)))


def build_optimizer(params: list[torch.nn.Parameter], ocfg, total_steps: int):
    """AdamW (weight decay on matrices only) and the warm-up + schedule ``LambdaLR`` of ``optim``.
    -> ``(optimizer, scheduler)``."""
    wd = float(ocfg.weight_decay)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=float(ocfg.lr), betas=tuple(float(b) for b in ocfg.betas),
                                  eps=float(ocfg.eps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=int(ocfg.warmup_steps), total=int(total_steps), schedule=str(ocfg.schedule),
        min_ratio=float(ocfg.min_lr_ratio)))
    return optimizer, scheduler


def build_ema(model: torch.nn.Module, ecfg):
    """The EMA of ``model`` per the ``ema`` config: ``(AveragedModel, update)`` with
    ``update(step)`` averaging in ``model`` at :func:`ema_decay`'s decay for optimiser step
    ``step`` (integer buffers, e.g. step counters, are copied, not averaged); ``(None, None)``
    when disabled."""
    if not ecfg.enabled:
        return None, None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(ecfg.decay)), use_buffers=True)
    decay_at = partial(ema_decay, decay=float(ecfg.decay), power=None if ecfg.power is None else float(ecfg.power),
                       inv_gamma=float(ecfg.inv_gamma), min_decay=float(ecfg.min_decay),
                       update_after_step=int(ecfg.update_after_step))

    @torch.no_grad()
    def update(step: int) -> None:
        ema.multi_avg_fn = get_ema_multi_avg_fn(decay_at(step))
        ema.update_parameters(model)
        for b_ema, b in zip(ema.module.buffers(), model.buffers()):
            if not (b.is_floating_point() or b.is_complex()):
                b_ema.copy_(b)

    return ema, update


# ------------------------------------------------------------------------------ debug
def apply_debug(cfg: DictConfig) -> None:
    """``debug=true``: a few steps, frequent eval / checkpoints / logs, no workers."""
    with open_dict(cfg):
        t = cfg.trainer
        t.max_steps = min(int(t.max_steps), 6)
        t.eval_every, t.ckpt_every, t.log_every, t.num_workers = 3, 3, 1, 0


# ------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False


def init_distributed(device_cfg: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_cfg != "cpu"
        # long timeout: rank 0 evaluates (policy rollouts, FID) while the others wait
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=3))
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def broadcast_str(text: str, info: DistInfo) -> str:
    """Rank 0's string on every rank (tensors only, no pickling)."""
    if info.world == 1:
        return text
    dev = comm_device()
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=dev)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(n, 0)
    buf = data if info.rank == 0 else torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


# ------------------------------------------------------------------------------ logging
class RunLogger:
    """JSONL metrics file (always) plus wandb (``logger=wandb``; ``WANDB_MODE`` defaults to
    ``offline``). Rank 0 only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resolved: dict, enabled: bool, run_id: str):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole run
        if cfg.logger == "wandb":
            os.environ.setdefault("WANDB_MODE", str(OmegaConf.select(cfg, "wandb.mode", default="offline")))
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=OmegaConf.select(cfg, "wandb.project", default="jumpflow"),
                                    entity=OmegaConf.select(cfg, "wandb.entity", default=None),
                                    name=OmegaConf.select(cfg, "wandb.name", default=None) or run_dir.name,
                                    dir=str(run_dir), config=resolved, id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _say(msg: str) -> None:
    print(f"jumpflow-train: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the loop
def train(cfg: DictConfig) -> dict:
    """Run (or resume) training as configured; returns ``{"run_dir", "step", "metrics",
    "train_seconds", "resumed_from_step"}``: ``train_seconds`` is the wall-clock time of the
    training loop summed over every resume (each checkpoint records it in its meta), and
    ``resumed_from_step`` the step this process started at (0 for a fresh run).

    Raises :class:`ConfigError` for bad configuration before anything is written."""
    cfg = copy.deepcopy(cfg)
    if bool(OmegaConf.select(cfg, "debug", default=False)):
        apply_debug(cfg)
    validate_config(cfg)
    info = init_distributed(str(cfg.trainer.device))
    threads = torch.get_num_threads()       # trainer.cpu_threads holds for this run only
    try:
        return _train(cfg, info)
    finally:
        torch.set_num_threads(threads)
        if info.owns_group and dist.is_initialized():
            gc.collect()        # FSDP / DDP state (reference cycles) goes while its process group lives
            dist.destroy_process_group()


def native_bf16_cpu(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (x86 ``avx512_bf16`` or ``amx_bf16``; Arm ``bf16``),
    read from ``cpuinfo``; False where that file is missing."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def short_schedule_warnings(objective, max_steps: int) -> list[str]:
    """One line for each of the objective's curricula that the run is too short to finish
    (``Objective.schedule_lengths``): the objective then trains, to the end, as a mix of its
    start and its end (e.g. sCT with its ``du/dt`` term at a fifth of its weight)."""
    return [f"warning: objective.{field} = {steps} but the run trains {max_steps} steps: "
            f"{getattr(objective, 'name', 'the objective')}'s curriculum ends at {min(1.0, max_steps / steps):.0%} "
            f"of its course (set objective.{field} to at most trainer.max_steps)"
            for field, steps in objective.schedule_lengths().items() if steps > max_steps]


def _train(cfg: DictConfig, info: DistInfo) -> dict:
    tcfg, seed = cfg.trainer, int(cfg.seed)
    if tcfg.device == "auto":
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tcfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if tcfg.get("cpu_threads"):
        torch.set_num_threads(int(tcfg.cpu_threads))

    # -- build everything first: configuration errors end the run before any write --------
    seed_everything(seed)
    parts = build_components(cfg)
    task, model, objective = parts.task, parts.model.to(device), parts.objective
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve
        raise ConfigError(getattr(err, "full_key", "") or "config", str(err).splitlines()[0]) from None
    run_dir = resolved.get("run_dir")
    if not run_dir:
        raise ConfigError("run_dir", "must be set")
    run_dir = Path(broadcast_str(str(run_dir), info))
    resolved["run_dir"] = str(run_dir)
    dataset = task.train_dataset()
    shards = info.world * int(tcfg.grad_accum)
    global_batch = int(tcfg.batch_size)
    GlobalBatchSampler(len(dataset), global_batch, shards, [0], seed)       # checks the batch split
    for line in short_schedule_warnings(objective, int(tcfg.max_steps)) if info.rank == 0 else []:
        _say(line)
    use_bf16 = tcfg.precision == "bf16"
    jvp_bf16 = bool(tcfg.get("jvp_bf16", False))
    if use_bf16 and getattr(objective, "uses_jvp", False) and not jvp_bf16:
        if info.rank == 0:
            _say("note: bf16 autocast is off for this objective (it differentiates with JVPs; "
                 "trainer.jvp_bf16=true keeps it on through them)")
        use_bf16 = False
    if use_bf16 and device.type == "cpu" and not native_bf16_cpu() and info.rank == 0:
        _say("warning: this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 autocast runs emulated, "
             "much slower than fp32 (bench/speedups measured 13x)")

    if info.world > 1:   # same initialisation everywhere (it already is, by the seed)
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)

    ema, ema_update = build_ema(model, cfg.ema)
    if tcfg.get("compile", False):
        if getattr(objective, "uses_jvp", False):
            # a forward-mode JVP through a compiled module graph-breaks or fails; the eager JVP is the tested one
            if info.rank == 0:
                _say("note: torch.compile is off for this objective (it differentiates with JVPs)")
        else:
            # in place: parameter names, checkpoints and the EMA copy (made above) are unchanged
            model.backbone.compile()
    parallel = str(OmegaConf.select(cfg, "trainer.parallel", default="ddp"))
    loss_module = LossModule(model, bf16=use_bf16, jvp_bf16=jvp_bf16)
    sharded = info.world > 1 and parallel == "fsdp"
    eval_copy = None
    if sharded:
        # rank 0 evaluates alone: it gets an unsharded copy that the gathered weights are loaded into
        eval_copy = copy.deepcopy(model) if info.rank == 0 else None
        fsdp_shard(loss_module)                   # blocks, then the loss module (its forward is the root's)
        if ema is not None:
            fsdp_shard(ema.module)                # EMA shards sit where the model's do

    params = [p for p in model.parameters() if p.requires_grad]
    max_steps = int(tcfg.max_steps)
    optimizer, scheduler = build_optimizer(params, cfg.optim, max_steps)

    # -- resume ------------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    step, run_id = 0, None
    # wall-clock seconds of training before this process (checkpoint meta ``train_seconds``, summed
    # over resumes); the time between an interrupted segment's last checkpoint and its end is lost
    prior_seconds = 0.0
    resume = cfg.resume
    if resume:
        if isinstance(resume, str) and resume.lower() not in ("true", "latest"):
            found = (Path(resume), *read_checkpoint(resume))
        else:
            found = latest_valid_checkpoint(ckpt_dir, warn=_say if info.rank == 0 else (lambda m: None))
        if found is None:
            if info.rank == 0:
                _say(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            path, tensors, meta = found
            step, run_id = restore_state(path, tensors, meta, model, ema, optimizer, scheduler, cfg, warn=_say)
            if "train_seconds" in meta:
                prior_seconds = meta["train_seconds"]
                if (isinstance(prior_seconds, bool) or not isinstance(prior_seconds, (int, float))
                        or not math.isfinite(prior_seconds) or prior_seconds < 0):
                    raise CheckpointError(f"checkpoint {path}: train_seconds must be a finite number >= 0, "
                                          f"got {prior_seconds!r}")
                prior_seconds = float(prior_seconds)
            elif info.rank == 0 and step > 0:
                _say(f"warning: {path} does not record its training time; train_seconds counts from this resume")
            saved = tensors.get("rng.data_sampler")
            probe = GlobalBatchSampler(len(dataset), global_batch, shards, [0], seed)
            if saved is not None and not torch.equal(saved, probe.generator(probe.position(step)["epoch"]).get_state()):
                _say("warning: the data order differs from the checkpoint's (seed or dataset size changed)")
            if info.rank == 0:
                _say(f"resumed from {path} at step {step}")
    run_id = run_id or f"{run_dir.name}-{mix_seed(seed, time.time_ns()) % 10**8:08d}"

    # -- run directory (rank 0) ----------------------------------------------------------------
    is_main = info.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    logger = RunLogger(cfg, run_dir, resolved, is_main, run_id)

    sampler = GlobalBatchSampler(len(dataset), global_batch, shards,
                                 [info.rank * int(tcfg.grad_accum) + m for m in range(int(tcfg.grad_accum))],
                                 seed, start_step=step)
    workers = int(tcfg.num_workers)
    loader = DataLoader(ItemSeeded(dataset), batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=2 if workers > 0 else None)
    batches = iter(loader)

    def evaluate(at: int) -> dict:
        if sharded:                               # every rank gathers; rank 0 evaluates an unsharded copy
            state = gather_full_state(ema.module if ema is not None else model)
            if not is_main:
                return {}
            eval_copy.load_state_dict(state)
        if not is_main:
            return {}
        target = eval_copy if sharded else ema.module if ema is not None else model
        was = target.training
        target.eval()
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(mix_seed(seed, at, 0xE7A1))
            out = task.evaluate(target, str(run_dir), at)
        random.setstate(py)
        np.random.set_state(npy)
        target.train(was)
        metrics = {f"eval/{k}": float(v) for k, v in (out or {}).items()}
        logger.log(at, metrics)
        return metrics

    def checkpoint(at: int) -> None:
        full = None
        if sharded:                               # a collective: the full (unsharded) state on rank 0
            full = (gather_full_state(model), None if ema is None else gather_full_state(ema),
                    gather_full_state(optimizer))
        if is_main:
            position = sampler.position(at)
            tensors, meta = collect_state(model, ema, optimizer, scheduler, resolved, position, info.world, run_id,
                                          task.artifact(), full=full)
            tensors["rng.data_sampler"] = sampler.generator(position["epoch"]).get_state()
            meta["train_seconds"] = prior_seconds + (time.perf_counter() - t_start)
            save_checkpoint(ckpt_dir, at, tensors, meta, keep=int(tcfg.keep_checkpoints))

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, disable=not (is_main and bool(tcfg.progress)), desc="train",
               dynamic_ncols=True, mininterval=1.0)
    accum, eval_every, ckpt_every = int(tcfg.grad_accum), int(tcfg.eval_every), int(tcfg.ckpt_every)
    log_every = int(tcfg.log_every)
    grad_clip = None if tcfg.grad_clip is None else float(tcfg.grad_clip)
    eval_metrics: dict = {}
    last_saved = step if resume and step > 0 else -1
    start_step = step
    engine = wrap_ddp(loss_module, device) if info.world > 1 and not sharded else loss_module
    coupled = shards > 1 and bool(getattr(objective, "couples_shards", False))

    def record_shards(micro_batches: list, at: int) -> list[dict]:
        """The prepass of a loss that couples shards, with grad_accum > 1: each micro-batch's
        contribution to the global batch, recorded without gradient (same seeds as the pass)."""
        local = []
        with torch.no_grad():
            for micro, batch in enumerate(micro_batches):
                shard = info.rank * accum + micro
                torch.manual_seed(mix_seed(seed, at, shard, 0x401E))
                try:
                    with shard_scope(ShardSet(shard, info.world, accum, recording=True)):
                        loss_module(batch)
                except ShardPayload as recorded:
                    local.append(recorded.payload)
                else:
                    raise RuntimeError(f"{type(objective).__name__} couples shards but never called gather_shards")
        return local

    model.train()
    t_start = t_last = time.perf_counter()
    steps_since = 0
    try:
        while step < max_steps:
            sums: dict[str, float] = {}
            loss_sum = torch.zeros((), device=device)
            step_set = None
            if coupled:
                micro_batches = [to_device(next(batches), device) for _ in range(accum)]
                step_set = {"local": record_shards(micro_batches, step) if accum > 1 else None, "cache": {}}
            for micro in range(accum):
                batch = micro_batches[micro] if coupled else to_device(next(batches), device)
                shard = info.rank * accum + micro
                scope = None if step_set is None else ShardSet(shard, info.world, accum, **step_set)
                with set_gradient_sync(engine, sync=micro == accum - 1):    # no_sync but on the last
                    torch.manual_seed(mix_seed(seed, step, shard, 0x401E))
                    with shard_scope(scope):
                        loss, metrics = engine(batch)
                    (loss / accum).backward()     # DDP / FSDP average over ranks: the mean over all shards
                loss_sum += loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
            if sharded:
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            objective.on_step_end(model)
            step += 1
            if ema is not None:
                ema_update(step)
            steps_since += 1
            bar.update(1)

            if step % log_every == 0 or step == max_steps:
                loss_val = loss_sum / accum
                if info.world > 1:
                    loss_val = loss_val.to(comm_device())
                    dist.all_reduce(loss_val)
                    loss_val /= info.world
                loss_val = float(loss_val)
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss is {loss_val} at step {step}")
                now = time.perf_counter()
                rate = steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                logger.log(step, {"train/loss": loss_val, "train/lr": lr, "train/grad_norm": float(grad_norm),
                                  "train/it_per_s": rate, **{f"train/{k}": v for k, v in sums.items()}})
                bar.set_postfix(loss=f"{loss_val:.4g}", refresh=False)
            if eval_every and step % eval_every == 0:
                eval_metrics = evaluate(step) or eval_metrics
            if ckpt_every and step % ckpt_every == 0:
                checkpoint(step)
                last_saved = step
        if last_saved != step:
            checkpoint(step)
        if bool(tcfg.eval_at_end) and not (eval_every and step % eval_every == 0):
            eval_metrics = evaluate(step) or eval_metrics
    finally:
        bar.close()
        logger.close()
        del batches
    if info.world > 1:
        dist.barrier()
    return {"run_dir": str(run_dir), "step": step, "metrics": eval_metrics,
            "train_seconds": prior_seconds + (time.perf_counter() - t_start), "resumed_from_step": start_step}
