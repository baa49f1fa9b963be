"""Scripted-expert demonstrations written in robomimic's HDF5 format (``jumpflow-demos``).

Layout (what robomimic's own datasets hold, so one reader serves both)::

    data                       attrs: total (sum of num_samples), env_args (JSON env_meta)
    data/demo_<i>              attrs: num_samples, model_file (scene XML), seed, success
                               (+ mh style: style, mode, quality, speed, pos_gain, n_pauses, ...)
        states    (T, S) float64   flattened MuJoCo state before each action
        actions   (T, 7) float64   OSC_POSE delta actions in [-1, 1]
        rewards   (T,)   float64   sparse task reward
        dones     (T,)   int64     1 at the last step
        obs/<key>       (T, ...)   low-dim float64; <camera>_image (T, H, W, 3) uint8 upright
        next_obs/<key>  (T, ...)
    mask/train, mask/valid     arrays of demo names (bytes)

Seeds: attempt ``k`` (0-based) of a run with ``--seed s`` resets the env with seed ``s + k``;
failed attempts are dropped (and counted) unless ``keep_failed``. With the defaults
(``seed = 0``, at most ``2 n + 20`` attempts) demo seeds lie in ``[0, 100000)``; the rollout
evaluator's test seeds start at ``TEST_SEED_OFFSET = 1_000_000`` so they never overlap.

Styles: ``ph`` (default) is the scripted expert, one way of doing the task, as robomimic's
proficient-human sets. ``mh`` draws a human-like operator style per episode (speed, gains, pauses,
smooth noise, detours, grasp choice, missed grasps and their recovery; ``envs/experts.py``,
``MHExpert``), as robomimic's multi-human sets; every demo stores what it drew as attributes, and
``data`` gets ``demo_style = "mh"`` (ph files are exactly as before: no such attribute). ``dart``
(DART, Laskey et al. 2017) runs the ph expert's action plus Ornstein-Uhlenbeck noise drawn per
episode and stores the clean action as the label (``actions``) and what ran as ``executed_actions``
(replay these); a grasp that did not hold is recovered from (``DARTExpert``). Its demos visit the
states a cloned policy drifts into and label the way back, which ph demos never do.

The file is written by ``jumpflow.io.atomic_write`` (a temporary file renamed onto ``<out>`` only when
complete; temporary files of killed runs are removed by the next write).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jumpflow.envs.demo_format import record_episode, write_demo
from jumpflow.envs.sim import canonical_task, default_env_meta
from jumpflow.io import atomic_write

DEMO_SEED_LIMIT = 100_000      # demo seeds are expected below this; test seeds start at 1_000_000
DEFAULT_MAX_STEPS = {"Lift": 400, "PickPlaceCan": 400, "NutAssemblySquare": 400}
# mh episodes are slower (pauses, detours, a missed grasp); robomimic's mh demos run longer than ph too
MH_MAX_STEPS = {"Lift": 600, "PickPlaceCan": 800, "NutAssemblySquare": 800}


def episode_cap(task: str, style: str) -> int:
    """Steps an expert episode of a robosuite ``task`` (canonical name) in ``style`` may take
    (ph and dart: robomimic's 400; mh: ``MH_MAX_STEPS``)."""
    return (MH_MAX_STEPS if style == "mh" else DEFAULT_MAX_STEPS).get(task, 400)


def run_expert_episode(sim, expert, seed: int, max_steps: int, image_keys=()) -> dict:
    """Roll the expert out once from ``sim.reset(seed)``; stops at the first success.

    Returns a dict with ``states (T, S)``, ``actions (T, 7)``, ``rewards (T,)``, ``dones (T,)``,
    ``obs`` / ``next_obs`` ``{key: (T, ...)}``, ``model_file``, ``seed``, ``success``, and for an
    expert that draws a style per episode (``MHExpert``: it has ``reseed``, called with ``seed`` so
    the draw is a function of the seed alone) ``attrs``, what it drew.
    """
    obs = sim.reset(seed=seed)
    if hasattr(expert, "reseed"):
        expert.reseed(seed)
    expert.reset(obs)
    perturb = expert.perturb if getattr(expert, "labels_clean", False) else None     # dart: clean labels
    episode = record_episode(sim, expert.act, obs, seed, max_steps, model_file=sim.get_model_xml(), perturb=perturb)
    if hasattr(expert, "episode_attrs"):
        episode["attrs"] = expert.episode_attrs()
    return episode


_WORKER: dict = {}


def _start_worker(env_meta: dict, image_keys: tuple, camera_size: int, task: str, style: str, max_steps: int) -> None:
    """Build one process's simulator and expert (a worker of :func:`expert_episodes`)."""
    from jumpflow.envs.experts import make_expert
    from jumpflow.envs.sim import RobosuiteSim

    sim = RobosuiteSim(env_meta, obs_keys=None, image_keys=image_keys, camera_size=camera_size)
    _WORKER.update(sim=sim, expert=make_expert(task, sim.env, style=style), max_steps=max_steps,
                   image_keys=image_keys)


def _worker_episode(seed: int) -> dict:
    return run_expert_episode(_WORKER["sim"], _WORKER["expert"], seed, _WORKER["max_steps"], _WORKER["image_keys"])


def expert_episodes(env_meta: dict, image_keys: tuple, camera_size: int, task: str, style: str, max_steps: int,
                    seeds: range, workers: int = 1):
    """Yield the expert's episodes for ``seeds``, in seed order.

    An episode is a function of its seed alone (``reset(seed)``; an mh style is drawn from the seed),
    so ``workers > 1`` processes (spawned, each with its own simulator) give exactly the episodes one
    process gives, in the same order; a consumer that stops early leaves at most ``workers`` episodes
    computed for nothing."""
    if workers <= 1:
        _start_worker(env_meta, image_keys, camera_size, task, style, max_steps)
        try:
            for s in seeds:
                yield _worker_episode(s)
        finally:
            _WORKER.pop("sim").close()
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")      # no fork of a process that holds torch threads or GL contexts
    with ctx.Pool(workers, initializer=_start_worker,
                  initargs=(env_meta, image_keys, camera_size, task, style, max_steps)) as pool:
        yield from pool.imap(_worker_episode, seeds, chunksize=1)


def generate_demos(out: str | os.PathLike, task: str = "Lift", n_demos: int = 200, seed: int = 0,
                   image: bool = False, camera_size: int = 84, image_keys=("agentview_image",
                   "robot0_eye_in_hand_image"), keep_failed: bool = False, max_steps: int | None = None,
                   max_attempts: int | None = None, valid_fraction: float = 0.1, progress: bool = True,
                   compress_images: bool = False, style: str = "ph", workers: int = 1) -> dict:
    """Generate ``n_demos`` successful expert demos into a robomimic-format HDF5 at ``out``.

    Args:
        out: destination ``.hdf5`` path (written atomically: temp file, then rename).
        task: ``Lift`` / ``PickPlaceCan`` / ``NutAssemblySquare`` (aliases ``lift`` / ``can`` / ``square``).
        n_demos: number of demos to store.
        seed: first reset seed; attempt ``k`` uses ``seed + k``.
        image: also store ``image_keys`` (``camera_size`` x ``camera_size`` uint8, upright).
        keep_failed: store failed attempts too (``success`` attr False) instead of dropping them.
        max_steps: episode cap (default 400, robomimic's horizon; mh: ``MH_MAX_STEPS``, 600-800).
        max_attempts: give up after this many attempts (default ``2 * n_demos + 20``).
        valid_fraction: share of demos listed in ``mask/valid`` (the rest in ``mask/train``).
        style: ``"ph"`` (scripted expert), ``"mh"`` (a human-like style drawn per episode from
            the episode's seed, stored as ``data/demo_<i>`` attributes; see the module docstring) or
            ``"dart"`` (the expert's clean labels, executed with noise drawn per episode; the file
            also holds ``executed_actions``, what to replay).
        workers: processes rolling the expert out (robosuite tasks); the file is the same for any
            number (episodes are functions of their seeds and are written in seed order).
    Returns:
        ``{"path", "task", "style", "n_demos", "n_attempts", "n_failed", "success_rate", "seconds",
        "seconds_per_demo", "total_samples"}`` (+ ``"modes"``: demos per mode label, for mh).
    """
    import h5py
    from tqdm import tqdm

    from jumpflow.envs.experts import check_style
    from jumpflow.envs.metaworld_demos import is_metaworld_task
    from jumpflow.envs.planar_demos import generate_from_demos_args, is_planar_task

    if is_metaworld_task(task):    # MetaWorld v3 (push-v3, metaworld:push-v3): MetaWorld's scripted policies
        from jumpflow.envs.metaworld_demos import generate_from_demos_args as metaworld_from_demos_args
        return metaworld_from_demos_args(out, task, n_demos=n_demos, seed=seed, image=image, camera_size=camera_size,
                                         keep_failed=keep_failed, max_steps=max_steps, max_attempts=max_attempts,
                                         valid_fraction=valid_fraction, progress=progress,
                                         compress_images=compress_images, style=style)
    if is_planar_task(task):       # BlockPush / ReachAround: jumpflow's planar tasks and their oracles
        return generate_from_demos_args(out, task, n_demos=n_demos, seed=seed, image=image, camera_size=camera_size,
                                        keep_failed=keep_failed, max_steps=max_steps, max_attempts=max_attempts,
                                        valid_fraction=valid_fraction, progress=progress,
                                        compress_images=compress_images, style=style)
    check_style(style)
    task = canonical_task(task)
    if n_demos < 1:
        raise ValueError(f"n_demos must be >= 1, got {n_demos}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    max_steps = max_steps or episode_cap(task, style)
    max_attempts = max_attempts or 2 * n_demos + 20
    env_meta = default_env_meta(task, image=image, camera_size=camera_size)
    image_keys = tuple(image_keys) if image else ()
    episodes = expert_episodes(env_meta, image_keys, camera_size, task, style, max_steps,
                               range(seed, seed + max_attempts), workers)
    t0 = time.perf_counter()
    n_ok = n_failed = attempts = total = 0
    names: list[str] = []
    modes: dict[str, int] = {}
    try:
        def write(tmp_path: str) -> None:
            nonlocal n_ok, n_failed, attempts, total
            with h5py.File(tmp_path, "w") as f:
                data = f.create_group("data")
                bar = tqdm(total=n_demos, desc=f"{task} demos", unit="demo", disable=not progress,
                           file=sys.stderr)
                for ep in episodes:
                    attempts += 1
                    if not ep["success"]:
                        n_failed += 1
                        if not keep_failed:
                            bar.set_postfix(failed=n_failed)
                            continue
                    name = f"demo_{len(names)}"
                    write_demo(data.create_group(name), ep, compress_images)
                    names.append(name)
                    if "mode" in ep.get("attrs", {}):
                        modes[ep["attrs"]["mode"]] = modes.get(ep["attrs"]["mode"], 0) + 1
                    total += ep["actions"].shape[0]
                    n_ok += int(ep["success"]) if not keep_failed else 1
                    bar.update(1)
                    bar.set_postfix(failed=n_failed)
                    if n_ok >= n_demos:
                        break
                bar.close()
                if n_ok < n_demos:
                    raise RuntimeError(f"{task}: only {n_ok} of {n_demos} demos succeeded in {attempts} attempts "
                                       f"(seeds {seed}..{seed + attempts - 1}); nothing written to {out}")
                data.attrs["total"] = int(total)
                data.attrs["env_args"] = json.dumps(env_meta)
                if style != "ph":                 # ph files stay byte-identical to what they always were
                    data.attrs["demo_style"] = style
                n_valid = round(valid_fraction * len(names))
                if len(names) > 1:
                    n_valid = min(max(n_valid, 1 if valid_fraction > 0 else 0), len(names) - 1)
                else:
                    n_valid = 0
                mask = f.create_group("mask")
                mask.create_dataset("train", data=np.array(names[: len(names) - n_valid], dtype="S"))
                mask.create_dataset("valid", data=np.array(names[len(names) - n_valid:], dtype="S"))
                f.flush()
        atomic_write(out, write)      # a killed run leaves no half file; the next run removes its temp
    finally:
        episodes.close()
    seconds = time.perf_counter() - t0
    summary = {"path": str(out), "task": task, "style": style, "n_demos": len(names), "n_attempts": attempts,
               "n_failed": n_failed, "success_rate": (attempts - n_failed) / max(attempts, 1),
               "seconds": seconds, "seconds_per_demo": seconds / max(len(names), 1), "total_samples": total}
    if style == "mh":
        summary["modes"] = dict(sorted(modes.items()))
    return summary


def ensure_demos(path: str | os.PathLike, task: str = "Lift", n_demos: int = 200, seed: int = 0,
                 image: bool = False, style: str = "ph", workers: int = 1, **kwargs) -> Path:
    """Return ``path``, generating ``n_demos`` expert demos there first if the file is missing.

    An existing file is checked (readable robomimic HDF5 of the same task with at least
    ``n_demos`` demos, image keys present if ``image``, written in ``style``: a file without a
    ``demo_style`` attribute, robomimic's own included, counts as ``ph``) and never overwritten; a
    mismatch raises ``ValueError`` naming the file. ``workers``: processes generating robosuite demos
    (the planar and MetaWorld generators run in one). Extra ``kwargs`` go to :func:`generate_demos`.
    """
    from jumpflow.envs.experts import check_style
    from jumpflow.envs.metaworld_demos import ensure_metaworld_demos, is_metaworld_task
    from jumpflow.envs.planar_demos import ensure_planar_demos, is_planar_task

    if is_metaworld_task(task):    # MetaWorld v3 (push-v3): MetaWorld's scripted policies, the only style
        if style != "ph":
            raise ValueError(f"{task}: demo style {style!r} is not available for MetaWorld tasks; use style 'ph'")
        return ensure_metaworld_demos(path, task=task, n_demos=n_demos, seed=seed, image=image, **kwargs)
    if is_planar_task(task):       # BlockPush / ReachAround (oracle demos; the only style is theirs)
        if style != "ph":
            raise ValueError(f"{task}: demo style {style!r} is not available for planar tasks; use style 'ph'")
        return ensure_planar_demos(path, task=task, n_demos=n_demos, seed=seed, image=image, **kwargs)
    check_style(style)
    path = Path(path)
    task = canonical_task(task)
    if not path.exists():
        summary = generate_demos(path, task=task, n_demos=n_demos, seed=seed, image=image, style=style,
                                 workers=workers, **kwargs)
        print(f"[jumpflow-demos] wrote {summary['n_demos']} {task} {style} demos to {path} "
              f"({summary['n_failed']} failed attempts dropped, {summary['seconds_per_demo']:.2f} s/demo)",
              file=sys.stderr)
        return path
    from jumpflow.datasets.robomimic import RobomimicFile
    with RobomimicFile(path) as rf:
        if rf.env_meta.get("env_name") != task:
            raise ValueError(f"{path}: existing file holds task {rf.env_meta.get('env_name')!r}, "
                             f"asked for {task!r}; remove it or choose another path")
        file_style = rf.data.attrs.get("demo_style", "ph")
        file_style = file_style.decode() if isinstance(file_style, bytes) else str(file_style)
        if file_style != style:
            raise ValueError(f"{path}: existing file holds {file_style} demos, asked for {style}; "
                             "remove it or choose another path")
        if len(rf.demo_names()) < n_demos:
            raise ValueError(f"{path}: existing file holds {len(rf.demo_names())} demos, asked for {n_demos}; "
                             "remove it to regenerate")
        if image:
            keys = rf.obs_keys()
            if "agentview_image" not in keys:
                raise ValueError(f"{path}: existing file has no image observations (keys {keys}); "
                                 "asked for image=True")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jumpflow-demos",
        description="Write scripted-expert demonstrations (robosuite, OSC_POSE) as a robomimic-format HDF5.")
    p.add_argument("--task", default="Lift", help="Lift | PickPlaceCan | NutAssemblySquare (aliases: lift, can, square); "
                   "planar (oracle demos with a mode per demo): BlockPush | ReachAround; "
                   "MetaWorld (its scripted policies): push-v3 | metaworld:push-v3 | any v3 task")
    p.add_argument("--n-demos", type=int, default=200, help="successful demos to store (default 200)")
    p.add_argument("--out", required=True, help="output .hdf5 path (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="first reset seed; attempt k uses seed+k (default 0)")
    p.add_argument("--image", action="store_true",
                   help="also store agentview_image and robot0_eye_in_hand_image (uint8, upright)")
    p.add_argument("--camera-size", type=int, default=84, help="image side in pixels (default 84)")
    p.add_argument("--style", default="ph",
                   help="ph: the scripted expert (default); mh: a human-like style drawn per episode; "
                        "dart: the expert's labels executed with noise (recoveries included)")
    p.add_argument("--keep-failed", action="store_true", help="store failed attempts too")
    p.add_argument("--max-steps", type=int, default=None, help="episode cap (default 400)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="share of demos in mask/valid")
    p.add_argument("--workers", type=int, default=1,
                   help="processes rolling the expert out (robosuite tasks; the file does not depend on it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="write 2 demos only (smoke test)")
    return p


def main(argv=None) -> int:
    from jumpflow.envs.experts import STYLES

    args = build_parser().parse_args(argv)
    if args.style not in STYLES:              # checked here for one line and no file, not argparse's usage dump
        print(f"jumpflow-demos: --style must be one of {', '.join(STYLES)}; got {args.style!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"jumpflow-demos: {out} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    summary = generate_demos(out, task=args.task, n_demos=2 if args.debug else args.n_demos, seed=args.seed,
                             image=args.image, camera_size=args.camera_size, keep_failed=args.keep_failed,
                             max_steps=args.max_steps, valid_fraction=args.valid_fraction,
                             progress=not args.no_progress, style=args.style, workers=args.workers)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
