"""Closed-loop rollout evaluator for chunked policies on robomimic/robosuite tasks.

``RolloutEvaluator(...).run(policy) -> dict``; the policy implements
``predict_action(obs_dict) -> (B, n_action_steps, action_dim)`` (numpy or torch), where
``obs_dict[key]`` is a torch tensor ``(B, n_obs_steps, D)`` float32 (low-dim, raw, not
normalized) or ``(B, n_obs_steps, 3, H, W)`` uint8 (images, upright); an optional
``policy.reset()`` is called before each batch of episodes.

Seeds: episode ``i`` resets with seed ``seed_offset + i``; the default ``seed_offset`` is
``TEST_SEED_OFFSET = 1_000_000``, disjoint from the demo generator's seeds (``[0, 100000)`` by
default, see ``jumpflow.envs.demos``).

Parallelism: ``n_envs > 1`` runs ``gymnasium.vector.AsyncVectorEnv`` with the ``spawn`` start
method (forked workers inherit OpenGL / MuJoCo state and crash), autoreset disabled; episodes run
in batches of ``n_envs``. An environment that raises, crashes or produces a non-finite observation
ends its episode as a failure (``error`` in the per-episode record) and evaluation goes on.

Latency: wall time of ``policy.predict_action`` alone (plus making its output a numpy array,
which synchronises a GPU), per chunk, p50 / p95 in ms.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from jumpflow.checkpoint import atomic_write

TEST_SEED_OFFSET = 1_000_000


def _resolve_env_meta(env_meta) -> dict:
    if isinstance(env_meta, dict):
        return env_meta
    if isinstance(env_meta, (str, os.PathLike)):
        s = str(env_meta)
        if s.lstrip().startswith("{"):
            return json.loads(s)
        from jumpflow.datasets.robomimic import get_env_meta
        return get_env_meta(s)
    raise TypeError(f"env_meta must be a dict, a JSON string or a dataset path, got {type(env_meta)}")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class RolloutEvaluator:
    """Evaluate a policy over ``n_episodes`` seeded episodes.

    Args:
        env_meta: robomimic ``env_args`` dict, its JSON string, or the path of a robomimic HDF5.
        n_episodes: episodes (seeds ``seed_offset .. seed_offset + n_episodes - 1``).
        n_envs: parallel environments (1: in-process; > 1: spawned workers).
        max_steps: control steps per episode (robomimic: 400 for Lift / Can / Square).
        n_obs_steps, n_action_steps: observation history and actions executed per chunk.
        seed_offset: first test seed.
        video_dir, n_videos: write ``episode_<i>_seed<seed>.mp4`` for the first ``n_videos`` episodes.
        obs_keys: observation keys given to the policy (default: robomimic's low-dim keys).
        camera_size: side of ``*_image`` observations (None: env_meta's).
        video_camera, video_size, fps: video settings.
        terminate_on_success: end an episode at its first success.
    """

    def __init__(self, env_meta, n_episodes: int = 50, n_envs: int = 1, max_steps: int = 400,
                 n_obs_steps: int = 2, n_action_steps: int = 8, seed_offset: int = TEST_SEED_OFFSET,
                 video_dir: str | os.PathLike | None = None, n_videos: int = 0, obs_keys=None,
                 camera_size: int | None = None, video_camera: str = "agentview", video_size: int = 128,
                 fps: int = 20, terminate_on_success: bool = True):
        from jumpflow.envs.sim import LOW_DIM_KEYS

        self.env_meta = _resolve_env_meta(env_meta)
        if n_episodes < 1 or n_envs < 1:
            raise ValueError(f"n_episodes ({n_episodes}) and n_envs ({n_envs}) must be >= 1")
        self.n_episodes, self.n_envs = int(n_episodes), int(min(n_envs, n_episodes))
        self.max_steps, self.n_obs_steps, self.n_action_steps = int(max_steps), int(n_obs_steps), int(n_action_steps)
        self.seed_offset = int(seed_offset)
        self.video_dir = Path(video_dir) if video_dir is not None else None
        self.n_videos = int(n_videos) if video_dir is not None else 0
        self.obs_keys = list(obs_keys) if obs_keys is not None else list(LOW_DIM_KEYS)
        self.fps = fps
        self._env_kwargs = dict(env_meta=self.env_meta, obs_keys=self.obs_keys, n_obs_steps=self.n_obs_steps,
                                n_action_steps=self.n_action_steps, max_steps=self.max_steps,
                                camera_size=camera_size, terminate_on_success=terminate_on_success,
                                video_camera=video_camera, video_size=video_size)
        self._venv = None
        if self.n_videos > 0:
            from jumpflow.envs.rendering import require_offscreen_rendering
            require_offscreen_rendering()

    # ------------------------------------------------------------------ envs
    def _make_venv(self):
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode
        from jumpflow.envs.gym_env import RobomimicGymEnv

        fns = [functools.partial(RobomimicGymEnv, **self._env_kwargs) for _ in range(self.n_envs)]
        if self.n_envs == 1:
            return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        return gym.vector.AsyncVectorEnv(fns, context="spawn", shared_memory=True, daemon=True,
                                         autoreset_mode=AutoresetMode.DISABLED)

    def close(self) -> None:
        if self._venv is not None:
            try:
                self._venv.close(terminate=True) if self.n_envs > 1 else self._venv.close()
            except Exception:
                pass
            self._venv = None

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ run
    def _write_video(self, frames: np.ndarray, episode: int, seed: int) -> str:
        import imageio.v2 as imageio

        self.video_dir.mkdir(parents=True, exist_ok=True)
        path = self.video_dir / f"episode_{episode:03d}_seed{seed}.mp4"
        atomic_write(path, lambda tmp: imageio.mimwrite(tmp, list(frames), fps=self.fps, macro_block_size=1))
        return str(path)

    def run(self, policy) -> dict:
        """Run all episodes. Returns ``{"success_rate", "mean_max_reward", "mean_episode_length",
        "latency_ms_p50", "latency_ms_p95", "n_episodes", "n_env_errors", "seeds", "videos",
        "episodes": [{"seed", "success", "max_reward", "length", "error"}], "seconds"}``."""
        import torch

        t_start = time.perf_counter()
        if self._venv is None:
            self._venv = self._make_venv()
        n = self.n_envs
        episodes: list[dict] = []
        latencies: list[float] = []
        videos: list[str] = []
        for b0 in range(0, self.n_episodes, n):
            m = min(n, self.n_episodes - b0)
            seeds = [self.seed_offset + b0 + j for j in range(m)] + [0] * (n - m)
            active = np.array([j < m for j in range(n)])
            record = [bool(active[j] and b0 + j < self.n_videos) for j in range(n)]
            finals: list[dict | None] = [None] * n
            try:
                if self.n_videos > 0:
                    self._venv.set_attr("record", record)
                obs, info = self._venv.reset(seed=seeds, options={"reset_mask": active.copy()})
                if hasattr(policy, "reset"):
                    policy.reset()
                done = ~active.copy()
                for j in range(m):           # a reset that failed ends that episode at once
                    if info.get("error") is not None and info["error"][j]:
                        done[j] = True
                        finals[j] = {"success": False, "max_reward": 0.0, "steps": 0, "error": str(info["error"][j])}
                while not done.all():
                    obs_t = {k: torch.from_numpy(np.ascontiguousarray(obs[k])) for k in self.obs_keys}
                    t0 = time.perf_counter()
                    out = policy.predict_action(obs_t)
                    action = _to_numpy(out)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    if action.ndim != 3 or action.shape[0] != n or action.shape[1] < self.n_action_steps:
                        raise ValueError(f"policy.predict_action returned shape {tuple(action.shape)}, expected "
                                         f"({n}, >= {self.n_action_steps}, action_dim)")
                    obs, _, term, trunc, info = self._venv.step(action[:, : self.n_action_steps])
                    ended = (np.asarray(term) | np.asarray(trunc)) & ~done
                    for j in np.nonzero(ended)[0]:
                        finals[j] = {"success": bool(info["success"][j]), "max_reward": float(info["max_reward"][j]),
                                     "steps": int(info["steps"][j]), "error": str(info["error"][j])}
                    done |= ended
            except ValueError:
                raise
            except Exception as e:           # a worker died: its episodes fail, start fresh envs
                for j in range(m):
                    if finals[j] is None:
                        finals[j] = {"success": False, "max_reward": 0.0, "steps": 0,
                                     "error": f"vector env failed: {type(e).__name__}: {e}"}
                self.close()
                self._venv = self._make_venv()
            if any(record):
                try:
                    frames = self._venv.call("pop_frames")
                except Exception:
                    frames = [None] * n
                for j in range(m):
                    if record[j] and frames[j] is not None:
                        videos.append(self._write_video(frames[j], b0 + j, seeds[j]))
            for j in range(m):
                f = finals[j]
                episodes.append({"seed": seeds[j], "success": f["success"], "max_reward": f["max_reward"],
                                 "length": f["steps"], "error": f["error"]})
        lat = np.asarray(latencies) if latencies else np.zeros(1)
        return {
            "success_rate": float(np.mean([e["success"] for e in episodes])),
            "mean_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
            "mean_episode_length": float(np.mean([e["length"] for e in episodes])),
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
            "n_episodes": len(episodes), "n_env_errors": int(sum(bool(e["error"]) for e in episodes)),
            "seeds": [self.seed_offset, self.seed_offset + self.n_episodes - 1],
            "videos": videos, "episodes": episodes, "seconds": time.perf_counter() - t_start,
        }
