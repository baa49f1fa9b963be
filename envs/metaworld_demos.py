"""MetaWorld demonstrations from MetaWorld's own scripted policies, in robomimic's HDF5 layout.

Reference: the demo writers of :mod:`jumpflow.envs.demos` / :mod:`jumpflow.envs.planar_demos`
(same layout, read by ``jumpflow.datasets.robomimic``)::

    data                       attrs: total, env_args (JSON env_meta, type "metaworld"), noise_std
    data/demo_<i>              attrs: num_samples, model_file (""), seed, success (True)
        states    (T, S) float64   MetaWorldSim.get_state() before each action (see its layout)
        actions   (T, 4) float64   hand displacement (x 0.01 m) and gripper effort, in [-1, 1]
        rewards   (T,)   float64   MetaWorld's shaped reward
        dones     (T,)   int64     1 at the last step
        obs/<key>       (T, ...)   state (39), hand_pos, gripper, obj_state, goal_pos; images uint8
        next_obs/<key>  (T, ...)
    mask/train, mask/valid

Seeds: attempt ``k`` resets the env with ``seed + k``; the action noise (``noise_std``, Gaussian,
added to the scripted action before clipping; the stored action is the executed one) draws from
the independent stream ``np.random.default_rng([seed + k, 1])``. Episodes end at the first success
or at ``max_steps`` (MetaWorld's 500); only successful episodes are kept. Written atomically.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from jumpflow.envs.demo_format import (
    check_existing_demos,
    check_generation_args,
    demo_summary,
    record_episode,
    write_demo_file,
)


def generate_metaworld_demos(out: str | os.PathLike, task: str = "push-v3", n_demos: int = 50, seed: int = 0,
                             noise_std: float = 0.0, image: bool = False, camera_size: int = 84,
                             cameras=("corner2",), max_steps: int | None = None, max_attempts: int | None = None,
                             valid_fraction: float = 0.1, progress: bool = True, compress_images: bool = False,
                             env_kwargs: dict | None = None) -> dict:
    """Write ``n_demos`` successful scripted-policy demos of a MetaWorld task to a robomimic-layout HDF5.

    Args:
        out: destination ``.hdf5`` (written atomically).
        task: a MetaWorld v3 task (``push-v3``; ``metaworld:push-v3`` also accepted).
        n_demos: demos to store; seed: first reset seed (attempt ``k`` uses ``seed + k``).
        noise_std: Gaussian action noise (per entry, before clipping to [-1, 1]).
        image: also store ``<camera>_image`` for ``cameras`` (``camera_size`` square, uint8).
        max_steps: episode cap (default: ``env_kwargs["horizon"]``, MetaWorld's 500).
        max_attempts: give up after this many attempts (default ``2 * n_demos + 20``).
        valid_fraction: share of demos listed in ``mask/valid``.
        env_kwargs: overrides of :data:`jumpflow.envs.metaworld_env.DEFAULT_KWARGS` (stored in ``env_args``).
    Returns:
        ``{"path", "task", "n_demos", "n_attempts", "n_failed", "success_rate", "noise_std", "seconds",
        "seconds_per_demo", "total_samples"}`` (success rate over attempts).
    """
    from jumpflow.envs.metaworld_env import MetaWorldExpert, MetaWorldSim, check_task_name, metaworld_env_meta


    name = check_task_name(task)
    check_generation_args(n_demos, camera_size, valid_fraction)
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    env_meta = metaworld_env_meta(name, **{**(env_kwargs or {}), "camera_size": int(camera_size)})
    horizon = int(env_meta["env_kwargs"]["horizon"])
    max_steps = int(max_steps or horizon)
    if max_steps > horizon:
        raise ValueError(f"max_steps ({max_steps}) exceeds the env's horizon ({horizon})")
    max_attempts = int(max_attempts or 2 * n_demos + 20)
    image_keys = tuple(f"{c}_image" for c in cameras) if image else ()
    sim = MetaWorldSim(env_meta, image_keys=image_keys)
    expert = MetaWorldExpert(name, noise_std=noise_std)
    t0 = time.perf_counter()

    run = functools.partial(run_metaworld_episode, sim, expert, max_steps=max_steps)
    try:
        stats = write_demo_file(out, name, n_demos, seed, max_attempts, run, env_meta,
                                valid_fraction=valid_fraction, compress_images=compress_images, progress=progress,
                                data_attrs={"noise_std": float(noise_std)})
    finally:
        sim.close()
    return {**demo_summary(out, name, stats, time.perf_counter() - t0), "noise_std": float(noise_std)}


def run_metaworld_episode(sim, expert, episode_seed: int, max_steps: int) -> dict:
    """One episode of MetaWorld's scripted policy as the demo generator records it (env and expert
    reseeded with ``episode_seed``, actions clipped to [-1, 1], stopped at the first success); the
    expert-success bench (``bench/experts.py``) measures exactly this episode."""
    obs = sim.reset(seed=episode_seed)
    expert.reset(episode_seed)
    return record_episode(sim, expert.act, obs, episode_seed, max_steps, model_file=sim.get_model_xml())


def ensure_metaworld_demos(path: str | os.PathLike, task: str = "push-v3", n_demos: int = 50, seed: int = 0,
                           image: bool = False, **kwargs) -> Path:
    """Return ``path``, generating the demos first if the file is missing; an existing file is checked
    (same task, at least ``n_demos`` demos, an image key present if ``image``) and never overwritten."""
    from jumpflow.envs.metaworld_env import check_task_name

    path = Path(path)
    name = check_task_name(task)
    if not path.exists():
        summary = generate_metaworld_demos(path, task=name, n_demos=n_demos, seed=seed, image=image, **kwargs)
        print(f"[jumpflow-demos] wrote {summary['n_demos']} {name} demos to {path} "
              f"({summary['n_failed']} failed attempts dropped, {summary['seconds_per_demo']:.2f} s/demo)",
              file=sys.stderr)
        return path
    check_existing_demos(path, name, n_demos, image)
    return path


# ---------------------------------------------------------------------------- jumpflow-demos hook
def is_metaworld_task(task: str) -> bool:
    """Whether ``task`` is meant as a MetaWorld task (``metaworld:<name>`` or ``<name>-v<k>``); checked
    without importing MetaWorld, so that robosuite task names never need it."""
    from jumpflow.envs.metaworld_env import looks_like_metaworld

    return looks_like_metaworld(task)


def generate_from_demos_args(out, task: str, n_demos: int = 200, seed: int = 0, image: bool = False,
                             camera_size: int = 84, keep_failed: bool = False, max_steps: int | None = None,
                             max_attempts: int | None = None, valid_fraction: float = 0.1, progress: bool = True,
                             compress_images: bool = False, style: str = "ph", noise_std: float = 0.0,
                             **_robosuite_only) -> dict:
    """:func:`generate_metaworld_demos` called with ``jumpflow.envs.demos.generate_demos``'s arguments
    (robosuite-only ones, e.g. ``image_keys``, are ignored: the camera is ``corner2``)."""
    from jumpflow.envs.metaworld_env import check_task_name

    name = check_task_name(task)
    if style != "ph":
        raise ValueError(f"{name}: demo style {style!r} is not available for MetaWorld tasks (MetaWorld's scripted "
                         "policy is the only style; use noise_std for variety); use style 'ph'")
    if keep_failed:
        raise ValueError(f"{name}: keep_failed is not available for MetaWorld tasks (only successful demos are written)")
    return generate_metaworld_demos(out, task=name, n_demos=n_demos, seed=seed, noise_std=noise_std, image=image,
                                    camera_size=camera_size, max_steps=max_steps, max_attempts=max_attempts,
                                    valid_fraction=valid_fraction, progress=progress, compress_images=compress_images)
