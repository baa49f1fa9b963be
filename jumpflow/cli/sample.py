"""``jumpflow-sample``: class-balanced samples from a trained image generator, written as an
ADM-style ``.npz`` (``arr_0``: uint8 ``(N, H, W, C)``; ``arr_1``: int64 labels ``(N,)``), the
layout of the ADM evaluator (Dhariwal & Nichol 2021, ``evaluations/evaluator.py``) and of
``jumpflow-fid``.

Sample ``i`` has class ``i % num_classes``, so any prefix of ``num_classes * k`` samples is
balanced. Samples are written in shards ``shard_00000.npz, ...`` of ``--shard-size`` images;
shard ``k`` holds indices ``[k S, (k + 1) S)`` and its noise comes from a generator seeded by
``(seed, k)``, so an interrupted run, restarted with the same arguments, skips the shards that
exist and produces exactly the images an uninterrupted run would (no duplicates, no losses).
Every file is written to a temporary name and renamed.

    jumpflow-sample runs/mf_b2 --n 50000 --nfe 1 --out samples/mf_b2_nfe1
    jumpflow-fid samples/mf_b2_nfe1/samples_50000x256x256x3.npz VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jumpflow.io import atomic_write, atomic_write_text


def _atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def shard_noise_seed(seed: int, shard: int) -> int:
    return (int(seed) * 1_000_003 + int(shard) * 7_919 + 17) % (2**63 - 1)


def _valid_shard(path: Path, lo: int, hi: int) -> bool:
    try:
        with np.load(path, allow_pickle=False) as f:
            return (f["arr_0"].shape[0] == hi - lo and f["arr_1"].shape[0] == hi - lo
                    and int(f["first_index"]) == lo and f["arr_0"].dtype == np.uint8)
    except Exception:  # noqa: BLE001 - unreadable shard: regenerate it
        return False


def sample_shards(generate: Callable[[torch.Tensor, torch.Generator], np.ndarray], n: int, num_classes: int,
                  out_dir: str | Path, shard_size: int = 1000, batch_size: int = 250, seed: int = 0,
                  meta: dict | None = None, merge: bool = True, progress: bool = True) -> Path | None:
    """Write ``n`` class-balanced samples in resumable shards, then (``merge``) one ``.npz``.

    Args:
        generate: ``(labels (B,) int64, torch.Generator) -> uint8 (B, H, W, C)``; must draw all
            its randomness from the generator (the noise of a shard is then reproducible).
        meta: run description stored in ``meta.json``; a resumed run must have the same.
    Returns: the merged file ``samples_{N}x{H}x{W}x{C}.npz`` (ADM's naming), or ``None`` when
    ``merge`` is false.
    """
    if n < 1 or shard_size < 1 or batch_size < 1 or num_classes < 1:
        raise ValueError(f"n, shard_size, batch_size, num_classes must be >= 1; got {n}, {shard_size}, "
                         f"{batch_size}, {num_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"n": n, "num_classes": num_classes, "shard_size": shard_size, "seed": seed, **(meta or {})}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{meta_path}: this run differs from the one being resumed: "
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
                             + "; use a new --out folder")
    else:
        atomic_write_text(meta_path, json.dumps(run, indent=2))
    n_shards = (n + shard_size - 1) // shard_size
    t0 = time.time()
    for k in range(n_shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        path = out / f"shard_{k:05d}.npz"
        if path.exists() and _valid_shard(path, lo, hi):
            continue
        gen = torch.Generator().manual_seed(shard_noise_seed(seed, k))
        labels = torch.arange(lo, hi) % num_classes
        imgs = [np.asarray(generate(labels[i:i + batch_size], gen)) for i in range(0, hi - lo, batch_size)]
        _atomic_savez(path, arr_0=np.concatenate(imgs), arr_1=labels.numpy(), first_index=np.int64(lo))
        if progress:
            print(f"jumpflow-sample: shard {k + 1}/{n_shards} ({hi}/{n} images, {time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    if not merge:
        return None
    return merge_shards(out, n)


def merge_shards(out_dir: str | Path, n: int) -> Path:
    """Concatenate ``shard_*.npz`` (checked contiguous, ``n`` images) into ADM's ``.npz``."""
    out = Path(out_dir)
    shards = sorted(out.glob("shard_*.npz"))
    arrs, labels, expect = [], [], 0
    for path in shards:
        with np.load(path, allow_pickle=False) as f:
            if int(f["first_index"]) != expect:
                raise ValueError(f"{path}: starts at {int(f['first_index'])}, expected {expect} (missing shard?)")
            arrs.append(f["arr_0"])
            labels.append(f["arr_1"])
            expect += f["arr_0"].shape[0]
    if expect != n:
        raise ValueError(f"{out}: shards hold {expect} images, expected {n}")
    x = np.concatenate(arrs)
    name = out / f"samples_{'x'.join(str(s) for s in x.shape)}.npz"
    _atomic_savez(name, arr_0=x, arr_1=np.concatenate(labels))
    return name


def model_generate_fn(model, nfe: int, guidance: float | None = None, device="cpu",
                      to_pixels: Callable | None = None):
    """``generate(labels, gen)`` for a trained ``Generator`` (``model.task`` an ``ImageTask``)."""
    from jumpflow.datasets.images import to_uint8

    obj = model.objective
    if guidance is not None and guidance != 1.0:
        if not hasattr(obj, "guidance"):
            raise ValueError(f"--guidance: {type(obj).__name__} has no sampling-time guidance (MeanFlow folds "
                             "guidance into training: objective.omega / objective.kappa)")
        obj.guidance = float(guidance)
    elif guidance is not None and hasattr(obj, "guidance"):
        obj.guidance = float(guidance)
    shape = tuple(model.shape)
    to_pixels = to_pixels or getattr(getattr(model, "task", None), "to_pixels", lambda x: x.clamp(-1, 1))

    @torch.no_grad()
    def generate(labels: torch.Tensor, gen: torch.Generator) -> np.ndarray:
        noise = torch.randn((labels.shape[0], *shape), generator=gen).to(device)
        x = model.generate(labels.to(device), noise=noise, steps=nfe)
        return to_uint8(to_pixels(x.float())).cpu().numpy()

    return generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jumpflow-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (newest checkpoint) or a checkpoint file")
    p.add_argument("--out", required=True, help="output folder (shards, meta.json, merged .npz)")
    p.add_argument("--n", type=int, default=50_000, help="number of samples (FID-50k: 50000)")
    p.add_argument("--nfe", type=int, default=1, help="sampling steps / network evaluations")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for objectives that guide at sampling (flow_matching, ddpm)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA copy")
    p.add_argument("--vae-path", default=None, help="local AutoencoderKL folder to decode latents")
    args = p.parse_args(argv)

    from jumpflow.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run)
    model, _ = load_model(args.run, use_ema=not args.no_ema, device=args.device)
    task = model.task
    if args.vae_path:
        task.vae_path = args.vae_path
    num_classes = int(getattr(task, "num_classes", 0))
    if num_classes < 1:
        raise SystemExit("jumpflow-sample: error: the run's task has no num_classes (not an image task)")
    gen = model_generate_fn(model, args.nfe, args.guidance, args.device)
    meta = {"checkpoint": str(Path(ckpt).resolve()), "nfe": args.nfe, "guidance": args.guidance,
            "ema": not args.no_ema, "objective": type(model.objective).__name__}
    path = sample_shards(gen, args.n, num_classes, args.out, args.shard_size, args.batch_size, args.seed, meta)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
