"""Scale-out on PyTorch's own engines: the loss module that DDP / FSDP wrap, the shards of a
global batch (for losses that couple samples across processes), and FSDP helpers.

**The loss module.** ``torch.func.jvp`` cannot go *through* the DDP wrapper (the wrapper's
forward is not a function of the parameters that functorch can transform) and the dual-tensor
path was never tried through it, so the objectives' JVP (``jumpflow.objectives.base.jvp``, either
backend) runs *inside* DDP's forward. :class:`LossModule` holds the generator (the module the trainer
trains) and its ``forward(batch)`` is the objective's loss; DDP wraps the loss module, so every
objective (MeanFlow's and TVM's JVPs, EMA targets in ``net.aux``, ``net.null_cond``, a second
or third network evaluation) runs in DDP's forward, and DDP keeps what it exists for: gradient
buckets all-reduced while the backward pass still runs, and ``no_sync`` for gradient
accumulation (the lumalabs TVM code, ``training/wrapper.py``, does the same)::

    engine = DistributedDataParallel(LossModule(generator), find_unused_parameters=True,
                                     broadcast_buffers=False)
    loss, metrics = engine(batch)          # the objective calls generator(...) inside
    (loss / grad_accum).backward()         # DDP averages over processes

Inside, objectives call the bare generator (``net(x, t, h, cond)``, ``net.aux[...]``): DDP
registers its hooks on the parameters' gradient accumulators, not on the call path, so any
use of a parameter under DDP's forward reaches the reducer.

``find_unused_parameters=True``: which parameters a loss reaches depends on the objective and
its options (a guidance embedding that only a sampled scale uses, a frozen EMA target that needs
none, heads that some objectives never call), and may change from step to step; with ``False``
DDP would hang or raise on the first step that leaves one out, and ``static_graph=True`` would
silently assume the first step's set forever. The cost is one walk of the autograd graph per
forward (``bench/ddp.py`` measures it). A parameter that no process used keeps ``grad = None``,
as in one process (AdamW then skips it).

**Shards of one global batch.** The global batch of a step is split in ``S = world *
grad_accum`` shards (contiguous slices; the objective's noise is seeded per shard). A loss that
couples samples across the batch (Drifting's field: each generated sample is attracted by the
positives and repelled by the other generated samples of its condition) asks for the other
shards with :func:`gather_shards`: a dict of tensors per shard, detached, all-gathered across
processes; with ``grad_accum > 1`` a no-grad prepass over this process's micro-batches records
their dicts first (:class:`ShardSet` ``recording``), so the set a micro-batch sees does not
depend on how the shards are spread over processes and micro-batches. Outside a multi-shard
step, ``gather_shards`` returns the caller's own dict only (single-process behaviour).

**FSDP.** :func:`fsdp_shard` applies ``torch.distributed.fsdp.fully_shard`` to each block of a
module's ``nn.ModuleList`` s (transformer blocks, UNet stages), then to the module itself;
parameter names do not change, so checkpoints (``jumpflow.checkpoint``: full state gathered on
save, sharded back on load) look like a single process's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "PARALLEL",
    "LossModule",
    "ShardPayload",
    "ShardSet",
    "all_gather_payloads",
    "comm_device",
    "current_shards",
    "fsdp_shard",
    "gather_shards",
    "is_sharded",
    "shard_scope",
    "wrap_ddp",
]

#: the trainer's ``trainer.parallel`` choices (used when the run has more than one process)
PARALLEL = ("ddp", "fsdp")


def comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------ the loss module
class LossModule(nn.Module):
    """The generator and its objective as one module: ``forward(batch) -> (loss, metrics)``.

    ``loss`` is the mean of the objective's per-sample loss (a float32 scalar), ``metrics`` the
    objective's float diagnostics. The objective runs inside this forward (under bf16 autocast
    when ``bf16``; JVP objectives switch autocast off around their JVPs themselves,
    ``jvp_context``, unless ``jvp_bf16``), so DDP or FSDP wrapping this module sees every network evaluation the
    loss makes. ``self.model`` is the module that is trained, checkpointed and averaged (EMA).

    Args:
        model: a module with ``compute_loss(batch) -> LossOutput`` (``jumpflow.generator.Generator``).
        bf16: run the loss under ``torch.autocast(dtype=bfloat16)``.
        jvp_bf16: keep that autocast on inside the objective's JVPs too
            (:func:`jumpflow.objectives.base.autocast_through_jvps`); else they run in fp32.
    """

    def __init__(self, model: nn.Module, bf16: bool = False, jvp_bf16: bool = False):
        super().__init__()
        self.model = model
        self.bf16, self.jvp_bf16 = bool(bf16), bool(jvp_bf16)

    def forward(self, batch) -> tuple[Tensor, dict[str, float]]:
        if self.bf16:
            # imported here: jumpflow.objectives imports this module (shard-aware objectives)
            from jumpflow.objectives.base import autocast_through_jvps

            device_type = next(self.model.parameters()).device.type
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16), \
                    autocast_through_jvps(self.jvp_bf16):
                out = self.model.compute_loss(batch)
        else:
            out = self.model.compute_loss(batch)
        return out.loss.float().mean(), dict(out.metrics or {})


def wrap_ddp(loss_module: LossModule, device: torch.device, find_unused_parameters: bool = True) -> nn.Module:
    """``DistributedDataParallel`` over the loss module (see the module docstring for
    ``find_unused_parameters``): parameters and buffers are broadcast from rank 0 once; buffers
    are not re-broadcast at each forward (every process updates them identically)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    # torch >= 2.12 spells "sync at init, not at every forward" forward_sync_buffers=False
    buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(loss_module, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                   **buffers)


# ------------------------------------------------------------------------------ FSDP
def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fsdp_shard(module: nn.Module, mesh=None) -> nn.Module:
    """``fully_shard`` every block of every ``nn.ModuleList`` in ``module`` (blocks that hold
    parameters and are not lists themselves: DiT / MLP blocks, UNet stage layers), then
    ``module`` itself (the rest: embeddings, heads, objective modules in ``aux``). In place;
    parameter names are unchanged. ``mesh``: a 1-D device mesh (default: all processes)."""
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    blocks = []
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            blocks += [b for b in sub if not isinstance(b, nn.ModuleList) and any(True for _ in b.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def set_gradient_sync(engine: nn.Module, sync: bool):
    """A context for one micro-step (forward and backward inside it): DDP's ``no_sync``, or
    FSDP's ``set_requires_gradient_sync`` on the root (all its blocks), when ``sync`` is false
    (gradients accumulate locally, no communication); nothing for a single process."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(engine, DistributedDataParallel):
        return contextlib.nullcontext() if sync else engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):       # an FSDPModule (fully_shard)
        engine.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ shards of a global batch
@dataclass
class ShardSet:
    """The shards of one optimisation step, as seen by one micro-batch.

    Attributes:
        index: this shard's index in the global batch (``rank * grad_accum + micro``).
        world, accum: processes and micro-batches per process (``count = world * accum``).
        local: with ``accum > 1``: the recorded dicts of this process's micro-batches (the
            no-grad prepass), one per micro-batch; ``None`` with ``accum = 1``.
        recording: the prepass: :func:`gather_shards` raises :class:`ShardPayload` with the
            caller's dict instead of returning.
    """

    index: int = 0
    world: int = 1
    accum: int = 1
    local: list[dict[str, Tensor]] | None = None
    recording: bool = False
    cache: dict = field(default_factory=dict)        # the all-gathered dicts, shared by a step's micro-batches

    @property
    def count(self) -> int:
        return self.world * self.accum


class ShardPayload(Exception):
    """Raised by :func:`gather_shards` while recording: carries the shard's dict."""

    def __init__(self, payload: dict[str, Tensor]):
        super().__init__("shard payload recorded")
        self.payload = payload


_ACTIVE: ContextVar[ShardSet | None] = ContextVar("jumpflow_shards", default=None)


@contextlib.contextmanager
def shard_scope(shards: ShardSet | None) -> Iterator[None]:
    """Make ``shards`` the current step's shard set for the losses computed inside."""
    token = _ACTIVE.set(shards)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_shards() -> ShardSet | None:
    """The current shard set when the step has more than one shard, else ``None``."""
    shards = _ACTIVE.get()
    return shards if shards is not None and shards.count > 1 else None


def gather_shards(payload: dict[str, Tensor]) -> tuple[list[dict[str, Tensor]], int]:
    """``(dicts of every shard of the global batch in shard order, index of the caller's)``.

    ``payload``: tensors of the caller's shard with at least one dimension, each of which may
    differ in its first dimension between shards (the rest is fixed); every shard passes the
    same keys. No gradient flows through the others' tensors. One shard: ``([payload], 0)``."""
    shards = current_shards()
    if shards is None:
        return [payload], 0
    if shards.recording:
        raise ShardPayload({k: v.detach() for k, v in payload.items()})
    key = "parts"
    if key not in shards.cache:
        local = shards.local if shards.local is not None else [payload]
        if len(local) != shards.accum:
            raise RuntimeError(f"gather_shards: {len(local)} recorded micro-batches, expected {shards.accum}")
        local = [{k: v.detach() for k, v in p.items()} for p in local]
        shards.cache[key] = all_gather_payloads(local) if shards.world > 1 else local
    parts = list(shards.cache[key])
    parts[shards.index] = {k: v.detach() for k, v in payload.items()}      # the caller's own, as computed now
    return parts, shards.index


def all_gather_payloads(local: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """All-gather each process's list of ``k`` dicts (tensors of varying first dimension) into
    one list of ``world * k`` dicts, ordered by (rank, position). Two collectives per key plus
    one for the sizes; tensors travel padded to the largest process's total."""
    world, rank = dist.get_world_size(), dist.get_rank()
    keys = sorted(local[0])
    dev = comm_device()
    sizes = torch.tensor([[p[k].shape[0] for k in keys] for p in local], dtype=torch.int64, device=dev)  # (k, K)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = [s.cpu() for s in all_sizes]
    out: list[dict[str, Tensor]] = [{} for _ in range(world * len(local))]
    for ki, key in enumerate(keys):
        tail = tuple(local[0][key].shape[1:])
        width = math.prod(tail)
        flat = torch.cat([p[key].reshape(p[key].shape[0], width) for p in local]).to(dev)   # (n, width)
        n_max = max(int(s[:, ki].sum()) for s in all_sizes)
        buf = flat.new_zeros((n_max, width))
        buf[:flat.shape[0]] = flat
        bufs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(bufs, buf)
        for r in range(world):
            offset = 0
            for m in range(len(local)):
                n = int(all_sizes[r][m, ki])
                src = local[m][key] if r == rank else bufs[r][offset:offset + n].reshape(n, *tail)
                out[r * len(local) + m][key] = src.to(local[m][key].device)
                offset += n
    return out
