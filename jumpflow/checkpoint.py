"""Checkpoints: safetensors for tensors, JSON for everything else. Never pickle.

A checkpoint is two files in ``<run_dir>/checkpoints/``:

* ``ckpt_<step>.safetensors``: tensors, keyed ``model.<name>`` (the trained module's state
  dict), ``ema.<name>`` (the ``AveragedModel``'s state dict, ``ema.module.<name>`` and
  ``ema.n_averaged``), ``optim.<path>`` (the optimiser's state tensors) and ``rng.<name>``
  (torch RNG states as uint8 tensors).
* ``ckpt_<step>.json``: ``step``, the resolved ``config``, the optimiser's non-tensor state
  (param groups, with tensors replaced by ``{"__tensor__": key}``), the scheduler state,
  python / numpy RNG states, the data position, and the ``sha256`` and ``size`` of the
  safetensors file.

Both are written atomically (temporary file in the same folder, ``fsync``, ``os.replace``,
``fsync`` of the folder), tensors first: a checkpoint exists once its JSON does, so a
process killed mid-write leaves the previous checkpoint as the latest one. The last
``keep`` checkpoints are kept. Reading verifies the sha256: a truncated or modified file
raises :class:`CheckpointError` naming the file (and the previous checkpoint, which stays
loadable).

FSDP (``trainer.parallel=fsdp``): the same files. On save every process all-gathers each
sharded tensor (:func:`gather_full_state`) and rank 0 writes the full state; on load every
process reads the full state and keeps its own shard (:func:`restore_state`), so a checkpoint
does not depend on how the run was split and resumes under DDP, FSDP or one process alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jumpflow.io import _fsync_dir, atomic_write, atomic_write_text  # noqa: F401 - re-exported

FORMAT = "jumpflow-checkpoint/1"
_NAME = re.compile(r"^ckpt_(\d+)\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


# ------------------------------------------------------------------ nested state <-> (tensors, JSON)
def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict / list / tuple by ``{"__tensor__": key}`` and put
    it in ``tensors[key]``; dicts with non-string keys become ``{"__items__": [[k, v], ...]}``.
    The result is JSON-serialisable (given JSON-able leaves)."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        if all(isinstance(k, str) for k in state):
            return {k: split_state(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
        return {"__items__": [[k, split_state(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        out = [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
        return {"__tuple__": out} if isinstance(state, tuple) else out
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a value of type {type(state).__name__} at {prefix!r}")


def merge_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__items__"}:
            return {k: merge_state(v, tensors) for k, v in skeleton["__items__"]}
        if set(skeleton) == {"__tuple__"}:
            return tuple(merge_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: merge_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [merge_state(v, tensors) for v in skeleton]
    return skeleton


def prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# ------------------------------------------------------------------ files
def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _storage_safe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory or are not contiguous: copy those."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        elif key is not None:
            seen.add(key)
        out[k] = v
    return out


# ------------------------------------------------------------------ save / list / read
def checkpoint_paths(ckpt_dir: str | Path) -> list[Path]:
    """JSON files of the complete checkpoints in ``ckpt_dir``, oldest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    Returns the JSON path."""
    folder = Path(ckpt_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt_{step:09d}"
    st_path, js_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    tmp = folder / f".{stem}.safetensors.tmp-{os.getpid()}"
    save_file(_storage_safe(tensors), str(tmp), metadata={"format": FORMAT, "step": str(step)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest, size = _sha256(tmp)
    os.replace(tmp, st_path)
    _fsync_dir(folder)
    meta = dict(meta, format=FORMAT, step=int(step), tensors_file=st_path.name, sha256=digest, size=size)
    atomic_write_text(js_path, json.dumps(meta, indent=1, allow_nan=True))
    for old in checkpoint_paths(folder)[:-keep]:
        old.unlink(missing_ok=True)                       # the JSON first: never half-listed
        (folder / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
    for stray in folder.glob(".ckpt_*.tmp-*"):            # left by a killed writer
        if not stray.name.endswith(f"-{os.getpid()}"):
            stray.unlink(missing_ok=True)
    return js_path


def _previous(path: Path) -> str:
    older = [p for p in checkpoint_paths(path.parent) if p.name < path.name]
    return f"; the previous checkpoint {older[-1]} is still usable" if older else ""


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify one checkpoint (its ``.json`` or ``.safetensors`` path).

    Returns ``(tensors, meta)``. Raises :class:`CheckpointError` naming the file when the
    JSON is unreadable, the tensor file is missing, truncated or modified (size / sha256),
    or safetensors cannot parse it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        meta = json.loads(path.read_text())
        st_path = path.parent / meta["tensors_file"]
        want_sha, want_size = meta["sha256"], int(meta["size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint metadata {path} is unreadable ({type(err).__name__}: {err})"
                              f"{_previous(path)}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if not st_path.is_file():
        raise CheckpointError(f"checkpoint tensor file {st_path} is missing{_previous(path)}")
    digest, size = _sha256(st_path)
    if size != want_size:
        raise CheckpointError(f"checkpoint tensor file {st_path} is truncated or damaged: {size} bytes, "
                              f"expected {want_size}{_previous(path)}")
    if digest != want_sha:
        raise CheckpointError(f"checkpoint tensor file {st_path} was modified: sha256 {digest[:12]}..., "
                              f"expected {want_sha[:12]}...{_previous(path)}")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint tensor file {st_path} cannot be parsed ({err}){_previous(path)}") from None
    return tensors, meta


def latest_valid_checkpoint(ckpt_dir: str | Path, warn=print):
    """``(path, tensors, meta)`` of the newest checkpoint that verifies, or ``None``.

    A damaged newer checkpoint is reported through ``warn`` (one line naming it) and
    skipped."""
    for path in reversed(checkpoint_paths(ckpt_dir)):
        try:
            tensors, meta = read_checkpoint(path)
        except CheckpointError as err:
            warn(f"warning: skipping damaged checkpoint: {err}")
            continue
        return path, tensors, meta
    return None


def resolve_checkpoint(run_dir_or_ckpt: str | Path) -> Path:
    """A run directory (its newest checkpoint), a ``checkpoints/`` folder, or a checkpoint file."""
    p = Path(run_dir_or_ckpt)
    if p.is_file() or p.suffix in (".json", ".safetensors"):
        return p.with_suffix(".json")
    for folder in (p / "checkpoints", p):
        paths = checkpoint_paths(folder)
        if paths:
            return paths[-1]
    raise CheckpointError(f"no checkpoint found in {p}")


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint {path}: {what} does not match the model built from the config "
                              f"({' '.join(first[:2])[:300]})") from None


def load_model(run_dir_or_ckpt: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """Rebuild the trained module from a run directory or checkpoint for sampling or evaluation.

    The task, backbone and objective are rebuilt from the resolved config stored in the
    checkpoint; the task is restored from the checkpoint's artifact (shapes, keys,
    ``env_meta``), so no dataset is opened or generated; weights (with the normalizer's
    statistics) are the EMA copy when present and ``use_ema`` (else the raw model).

    Returns:
        ``(model, cfg)``: the module in ``eval()`` mode on ``device`` and the config
        (an ``omegaconf.DictConfig``); ``model.task`` is the task object.
    """
    from omegaconf import OmegaConf

    from jumpflow.build import build_components

    path = resolve_checkpoint(run_dir_or_ckpt)
    tensors, meta = read_checkpoint(path)
    if "task" not in meta:
        raise CheckpointError(f"checkpoint {path}: no task artifact (written by an older jumpflow); "
                              "retrain or evaluate it with that version")
    cfg = OmegaConf.create(meta["config"])
    parts = build_components(cfg, artifact=meta["task"])
    model = parts.model
    ema_state = unprefixed(tensors, "ema.module")
    if use_ema and ema_state:
        load_state_into(model, ema_state, "EMA weights", path)
    else:
        load_state_into(model, unprefixed(tensors, "model"), "model weights", path)
    model.task = parts.task
    return model.to(device).eval(), cfg


# ------------------------------------------------------------------ FSDP: gather on save, shard on load
def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full(value, keep: bool):
    """A DTensor all-gathered (a collective), on the CPU where ``keep``; other values as they are."""
    if isinstance(value, torch.Tensor) and _is_dtensor(value):
        full = value.full_tensor()
        return full.cpu() if keep else None
    return value


def gather_full_state(obj) -> dict:
    """The unsharded ``state_dict()`` of an FSDP-sharded module (or ``AveragedModel``) or of an
    optimiser over sharded parameters: every DTensor all-gathered, in the layout of an unsharded
    run. A collective: every process calls it in the same order; rank 0 gets the state, the
    others an empty dict (they drop each gathered tensor at once)."""
    import torch.distributed as dist

    keep = dist.get_rank() == 0
    state = obj.state_dict()
    if isinstance(obj, torch.optim.Optimizer):
        inner = {i: {k: _full(v, keep) for k, v in s.items()} for i, s in state["state"].items()}
        return {"state": inner, "param_groups": state["param_groups"]} if keep else {}
    full = {k: _full(v, keep) for k, v in state.items()}
    return full if keep else {}


def _shard_like(full: torch.Tensor, ref):
    """``full`` as a DTensor placed like ``ref`` (this process keeps its own shard; no
    communication), or ``full`` itself when ``ref`` is not a DTensor."""
    if not (isinstance(ref, torch.Tensor) and _is_dtensor(ref)) or not isinstance(full, torch.Tensor):
        return full
    if tuple(full.shape) != tuple(ref.shape):
        return full                                      # load_state_dict names the mismatch
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def _sharded_like(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    current = module.state_dict()
    return {k: _shard_like(v, current.get(k)) for k, v in state.items()}


def _optimizer_sharded_like(optimizer, state: dict) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    inner = {}
    for i, s in state["state"].items():
        ref = params[int(i)] if int(i) < len(params) else None
        inner[i] = {k: (_shard_like(v, ref) if k != "step" else v) for k, v in s.items()}
    return {**state, "state": inner}


# ------------------------------------------------------------------ training state <-> checkpoint
def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": split_state(random.getstate(), "rng.python", {}),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def collect_state(model, ema, optimizer, scheduler, resolved: dict, position: dict, world_size: int,
                  run_id: str, task_artifact: dict, full: tuple | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a checkpoint holds: ``(tensors, JSON meta)`` (see the module docstring).

    ``full``: ``(model, ema, optimiser)`` state dicts already gathered by
    :func:`gather_full_state` (FSDP), used instead of the objects' own ``state_dict()``."""
    model_sd, ema_sd, optim_sd = full if full is not None else (
        model.state_dict(), None if ema is None else ema.state_dict(), optimizer.state_dict())
    tensors = prefixed(model_sd, "model")
    if ema is not None:
        tensors.update(prefixed(ema_sd, "ema"))
    optim_meta = split_state(optim_sd, "optim", tensors)
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"config": resolved, "task": task_artifact, "optimizer": optim_meta, "scheduler": sched, "rng": rng_meta,
            "data": position, "world_size": world_size, "run_id": run_id, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return tensors, meta


def restore_state(path, tensors, meta, model, ema, optimizer, scheduler, cfg, warn=print) -> tuple[int, str | None]:
    """Load a checkpoint into a run's model, EMA, optimiser, scheduler and RNGs; returns
    ``(step, run_id)``. An FSDP-sharded model (and its EMA and optimiser) keeps this process's
    shard of each full tensor."""
    sharded = any(_is_dtensor(p) for p in model.parameters())
    like = _sharded_like if sharded else (lambda module, state: state)
    load_state_into(model, like(model, unprefixed(tensors, "model")), "model weights", path)
    if ema is not None:
        state = unprefixed(tensors, "ema")
        if state:
            load_state_into(ema, like(ema, state), "EMA weights", path)
        else:
            warn(f"warning: {path} has no EMA weights; the EMA restarts from the model")
    try:
        optim_state = merge_state(meta["optimizer"], tensors)
        optimizer.load_state_dict(_optimizer_sharded_like(optimizer, optim_state) if sharded else optim_state)
        sched = dict(meta["scheduler"])
        sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
        scheduler.load_state_dict(sched)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: optimiser / scheduler state does not fit ({err})") from None
    torch.set_rng_state(tensors["rng.torch_cpu"])
    random.setstate(merge_state(meta["rng"]["python"], {}))
    kind, keys, pos, has_gauss, gauss = meta["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    old = meta.get("config", {})
    if old.get("seed") != cfg.get("seed"):
        warn(f"warning: seed changed since the checkpoint ({old.get('seed')} -> {cfg.get('seed')}); "
             "the run will not match an uninterrupted one")
    if old.get("trainer", {}).get("batch_size") != cfg.trainer.batch_size:
        warn("warning: trainer.batch_size changed since the checkpoint; the data order changes")
    return int(meta["step"]), meta.get("run_id")
