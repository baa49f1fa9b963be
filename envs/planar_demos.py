"""Oracle demonstrations of the planar tasks (BlockPush, ReachAround) in robomimic's HDF5 layout.

Reference: the demo writer of :mod:`jumpflow.envs.demos` (same layout, read by
``jumpflow.datasets.robomimic``), with the mode bookkeeping of the multimodal Block Push datasets
of Implicit BC / Diffusion Policy (each demo labelled by the order the oracle drew)::

    data                       attrs: total, env_args (JSON env_meta, type "jumpflow")
    data/demo_<i>              attrs: num_samples, model_file (MJCF), seed, success (True),
                                      mode ("b0t1" / "left" ...), draw (JSON of the oracle's draw)
        states    (T, S) float64   PlanarSim.get_state() before each action
        actions   (T, 2) float64   desired displacement in [-1, 1] (x max_delta); an oracle with
                                   ``labels_clean`` (BlockPush) labels with its noise-free law
        executed_actions (T, 2)    what ran (law + noise; labels_clean oracles only): replay these
        rewards   (T,)   float64
        dones     (T,)   int64     1 at the last step
        obs/<key>       (T, ...)   low-dim float64; overhead_image (T, H, W, 3) uint8
        next_obs/<key>  (T, ...)
    mask/train, mask/valid

Only successful episodes are kept, and only those whose committed mode (the sim's
``current_mode()`` at the end) is the mode the oracle drew, so a demo's label is what it did.
Seeds: attempt ``k`` resets the env with ``seed + k`` and draws the oracle's order from the
independent stream ``np.random.default_rng([seed + k, 1])``. The file is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jumpflow.envs.demo_format import (
    check_existing_demos,
    check_generation_args,
    demo_summary,
    record_episode,
    write_demo_file,
)

ORACLE_STREAM = 1        # second entry of the oracle's seed: independent of the env's initial-state draw


def _task_parts(task: str):
    """(canonical name, sim class, oracle class) of a planar task."""
    from jumpflow.envs.registry import PLANAR_ENVS, planar_task_name

    name = planar_task_name(task)
    if name is None:
        raise ValueError(f"unknown planar task {task!r}; valid: {sorted(PLANAR_ENVS)}")
    if name == "BlockPush":
        from jumpflow.envs.block_push import BlockPushOracle, BlockPushSim
        return name, BlockPushSim, BlockPushOracle
    from jumpflow.envs.reach_around import ReachAroundOracle, ReachAroundSim
    return name, ReachAroundSim, ReachAroundOracle


def make_oracle(task: str, max_delta: float = 0.03):
    """The scripted oracle of a planar task (``reset(obs, seed)``, ``act(obs)``, ``mode``, ``draw``)."""
    _, _, oracle_cls = _task_parts(task)
    return oracle_cls(max_delta=max_delta)


class PlanarOraclePolicy:
    """A planar task's oracle as a ``predict_action`` policy (for the rollout evaluator): one oracle
    per batch row, redrawn at every ``reset()`` (the evaluator calls it before each batch of
    episodes) from ``np.random.default_rng([seed, episode])``; the last observation step is used;
    returns ``(B, 1, 2)``. Use with ``n_action_steps = 1`` (the oracle is closed-loop)."""

    def __init__(self, task: str, seed: int = 0, max_delta: float = 0.03):
        self.task, self.seed, self.max_delta = task, int(seed), float(max_delta)
        _task_parts(task)
        self.oracles: list = []
        self.episodes = 0

    def reset(self) -> None:
        self.oracles = []

    def predict_action(self, obs_dict: dict) -> np.ndarray:
        obs = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in obs_dict.items()}
        b = next(iter(obs.values())).shape[0]
        while len(self.oracles) < b:
            oracle = make_oracle(self.task, self.max_delta)
            oracle.reset(seed=[self.seed, self.episodes])
            self.episodes += 1
            self.oracles.append(oracle)
        out = np.zeros((b, 1, 2), dtype=np.float32)
        for i in range(b):
            out[i, 0] = self.oracles[i].act({k: v[i, -1] for k, v in obs.items()})
        return out


def run_oracle_episode(sim, oracle, seed: int, max_steps: int) -> dict:
    """Roll the oracle out once from ``sim.reset(seed)``; stops at the first success.

    Returns ``states (T, S)``, ``actions (T, 2)``, ``rewards (T,)``, ``dones (T,)``, ``obs`` /
    ``next_obs`` ``{key: (T, ...)}``, ``model_file``, ``seed``, ``success``, ``p1`` (BlockPush: a
    block was in a target at some step), ``mode`` (the drawn one), ``realised_mode``, ``draw``.
    """
    obs = sim.reset(seed=seed)
    oracle.reset(obs, seed=[int(seed), ORACLE_STREAM])
    reached_p1 = []

    def note_p1() -> None:
        if sim.success_dict().get("p1", False):
            reached_p1.append(True)
    # DART oracles (labels_clean): run the perturbed action, label the state with the noise-free law
    clean_labels = bool(getattr(oracle, "labels_clean", False))
    episode = record_episode(sim, oracle.law if clean_labels else oracle.act, obs, seed, max_steps,
                             model_file=sim.get_model_xml(), after_step=note_p1,
                             perturb=oracle.perturb if clean_labels else None)
    return {**episode, "p1": bool(reached_p1) or episode["success"], "mode": oracle.mode,
            "realised_mode": sim.current_mode(), "draw": oracle.draw}


def generate_planar_demos(out: str | os.PathLike, task: str = "BlockPush", n_demos: int = 200, seed: int = 0,
                          image: bool = False, camera_size: int = 84, max_steps: int | None = None,
                          max_attempts: int | None = None, valid_fraction: float = 0.1, progress: bool = True,
                          compress_images: bool = False, env_kwargs: dict | None = None) -> dict:
    """Write ``n_demos`` successful oracle demos of a planar task to a robomimic-layout HDF5.

    Args:
        out: destination ``.hdf5`` (written atomically).
        task: ``BlockPush`` / ``ReachAround`` (aliases ``block_push``, ``reach_around``).
        n_demos: demos to store; seed: first reset seed (attempt ``k`` uses ``seed + k``).
        image: also store ``overhead_image`` (``camera_size`` square, uint8, upright).
        max_steps: episode cap (default: the task's horizon, 350 / 60).
        max_attempts: give up after this many attempts (default ``2 * n_demos + 20``).
        valid_fraction: share of demos listed in ``mask/valid``.
        env_kwargs: overrides of the task's default ``env_kwargs`` (stored in ``env_args``).
    Returns:
        ``{"path", "task", "n_demos", "n_attempts", "n_failed", "n_mode_mismatch", "success_rate",
        "p1_rate", "mode_counts", "seconds", "seconds_per_demo", "total_samples"}`` (rates over attempts).
    """
    from jumpflow.envs.registry import planar_env_meta


    name, sim_cls, oracle_cls = _task_parts(task)
    check_generation_args(n_demos, camera_size, valid_fraction)
    env_meta = planar_env_meta(name, **{**(env_kwargs or {}), "camera_size": int(camera_size)})
    max_steps = int(max_steps or env_meta["env_kwargs"]["horizon"])
    max_attempts = int(max_attempts or 2 * n_demos + 20)
    sim = sim_cls(env_meta, image_keys=("overhead_image",) if image else ())
    oracle = oracle_cls(max_delta=sim.max_delta)
    counts = {"p1": 0, "modes": {}}
    t0 = time.perf_counter()

    def run(episode_seed: int) -> dict:
        ep = run_oracle_episode(sim, oracle, episode_seed, max_steps)
        counts["p1"] += int(ep["p1"])
        ep["attrs"] = {**ep.get("attrs", {}), "mode": str(ep["mode"]), "draw": json.dumps(ep["draw"])}
        return ep

    def reject(ep: dict):
        if not ep["success"]:
            return "failed"
        if ep["realised_mode"] != ep["mode"]:
            return "mismatch"
        counts["modes"][ep["mode"]] = counts["modes"].get(ep["mode"], 0) + 1
        return None

    try:
        stats = write_demo_file(out, name, n_demos, seed, max_attempts, run, env_meta, reject=reject,
                                valid_fraction=valid_fraction, compress_images=compress_images, progress=progress,
                                data_attrs={"oracle_version": int(oracle_cls.VERSION)})
    finally:
        sim.close()
    summary = demo_summary(out, name, stats, time.perf_counter() - t0)
    return {**summary, "n_mode_mismatch": stats["rejected"].get("mismatch", 0),
            "p1_rate": counts["p1"] / max(stats["attempts"], 1), "mode_counts": dict(sorted(counts["modes"].items()))}


def ensure_planar_demos(path: str | os.PathLike, task: str = "BlockPush", n_demos: int = 200, seed: int = 0,
                        image: bool = False, **kwargs) -> Path:
    """Return ``path``, generating the demos first if the file is missing; an existing file is checked
    (same task, at least ``n_demos`` demos, ``overhead_image`` present if ``image``) and never overwritten."""
    path = Path(path)
    name, _, _ = _task_parts(task)
    if not path.exists():
        summary = generate_planar_demos(path, task=name, n_demos=n_demos, seed=seed, image=image, **kwargs)
        print(f"[jumpflow-demos] wrote {summary['n_demos']} {name} demos to {path} "
              f"({summary['n_failed'] + summary['n_mode_mismatch']} failed attempts dropped, "
              f"{summary['seconds_per_demo']:.2f} s/demo)", file=sys.stderr)
        return path
    check_existing_demos(path, name, n_demos, image)
    check_oracle_version(path, name)
    return path


def check_oracle_version(path: str | os.PathLike, task: str) -> None:
    """Demos written by an older version of a task's oracle are refused in one line (a file without
    the ``oracle_version`` attribute is version 1): reusing them silently would train on another
    expert than the one the benchmark describes."""
    import h5py

    name, _, oracle_cls = _task_parts(task)
    with h5py.File(path, "r") as f:
        version = int(f["data"].attrs.get("oracle_version", 1))
    if version != oracle_cls.VERSION:
        raise ValueError(f"{path}: data attrs 'oracle_version' is {version}, this jumpflow's {name} oracle is "
                         f"version {oracle_cls.VERSION}; remove the file to regenerate it")


# ---------------------------------------------------------------------------- jumpflow-demos hook
def is_planar_task(task: str) -> bool:
    """Whether ``task`` names a planar task (``BlockPush``, ``ReachAround`` or an alias)."""
    from jumpflow.envs.registry import planar_task_name

    return planar_task_name(task) is not None


def generate_from_demos_args(out, task: str, n_demos: int = 200, seed: int = 0, image: bool = False,
                             camera_size: int = 84, keep_failed: bool = False, max_steps: int | None = None,
                             max_attempts: int | None = None, valid_fraction: float = 0.1, progress: bool = True,
                             compress_images: bool = False, style: str = "ph", **_robosuite_only) -> dict:
    """:func:`generate_planar_demos` called with ``jumpflow.envs.demos.generate_demos``'s arguments
    (its robosuite-only ones, e.g. ``image_keys``, are ignored: the planar camera is ``overhead``)."""
    name, _, _ = _task_parts(task)
    if style != "ph":
        raise ValueError(f"{name}: demo style {style!r} is not available for planar tasks (their oracle is "
                         "the only style); use style 'ph'")
    if keep_failed:
        raise ValueError(f"{name}: keep_failed is not available for planar tasks (only successful demos "
                         "with their mode are written)")
    return generate_planar_demos(out, task=name, n_demos=n_demos, seed=seed, image=image, camera_size=camera_size,
                                 max_steps=max_steps, max_attempts=max_attempts, valid_fraction=valid_fraction,
                                 progress=progress, compress_images=compress_images)
