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

Execution modes (``mode``; see :mod:`jumpflow.eval.realtime`): ``sync`` (the world waits; the
default and what the evaluator always did), ``async``, ``ensemble`` and ``rtc``, each with an
inference delay ``delay`` of ``d`` control periods: fixed (``delay=int``: simulated) or
``"measured"`` (``d = ceil(latency * control_freq)`` per request, from the wall clock, so a slow
policy pays for its latency; ``control_freq`` from ``env_meta``, 20 Hz by default). The evaluator
keeps the chunk bookkeeping and sends the gym env blocks of single-step actions (up to the next
event: a request or an arrival), so the simulator steps exactly as if one action were sent per
control period. Time is counted in control periods: every executed step is one, and every period
in which the robot had no action (waiting for a chunk: in ``sync`` every request costs ``d``) is a
stall. Per episode: ``periods`` and ``periods_to_success`` (stalls included; exact when
``terminate_on_success``); the step limit ``max_steps`` counts executed actions, not periods.
``rtc`` commits the next ``d`` planned actions (with ``delay="measured"``: the previous request's
``d``, 1 before the first). ``async`` and ``rtc`` request a chunk every ``s = n_action_steps - d``
steps by default (at least 1; :func:`jumpflow.eval.realtime.execution_horizon`), so each chunk runs
rows ``d .. n_action_steps - 1``, within the action horizon the policy was trained to run.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from jumpflow.eval.realtime import (
    ChunkScheduler,
    ChunkSource,
    check_mode,
    control_freq_of,
    delay_steps,
    execution_horizon,
)
from jumpflow.io import atomic_write

TEST_SEED_OFFSET = 1_000_000
# per-episode info of envs with behaviour modes, kept in the episode records (jumpflow.eval.modes)
_BEHAVIOUR_KEYS = ("mode", "mode_switches")


def _resolve_env_meta(env_meta) -> dict:
    if env_meta is None:
        return {}
    if isinstance(env_meta, dict):
        return env_meta
    if isinstance(env_meta, (str, os.PathLike)):
        s = str(env_meta)
        if s.lstrip().startswith("{"):
            return json.loads(s)
        from jumpflow.datasets.robomimic import get_env_meta
        return get_env_meta(s)
    raise TypeError(f"env_meta must be a dict, a JSON string or a dataset path, got {type(env_meta)}")


def _check_delay(delay) -> int | str:
    if delay == "measured":
        return delay
    if isinstance(delay, (bool, np.bool_)) or not isinstance(delay, (int, np.integer)) or delay < 0:
        raise ValueError(f"delay: must be an int >= 0 (control periods) or 'measured', got {delay!r}")
    return int(delay)


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
        mode: execution mode, one of ``sync``, ``async``, ``ensemble``, ``rtc`` (``run`` may override).
        delay: inference delay in control periods (int >= 0) or ``"measured"`` (``run`` may override).
        execute_steps: steps between requests in ``sync`` / ``async`` / ``rtc``; None (default):
            ``n_action_steps`` in ``sync``, ``max(1, n_action_steps - d)`` in ``async`` / ``rtc`` (with
            ``delay="measured"``: the last measured ``d``), so that a chunk arriving ``d`` steps after
            its request runs rows ``d .. n_action_steps - 1`` and never a row past the action horizon.
        ensemble_every, ensemble_decay: ``ensemble`` requests a chunk every this many steps; ACT's
            weight ``exp(-decay * i)``, ``i = 0`` the oldest chunk.
        control_freq: control frequency in Hz for ``delay="measured"`` (None: env_meta's, else 20).
        env_fn: a zero-argument callable making the env (a ``RobomimicGymEnv`` look-alike: dict
            observations, ``(m, A)`` action blocks, ``info`` with ``success``, ``max_reward``,
            ``steps``, ``error``) instead of the robosuite one; ``env_meta`` may then be None.
        clock: time source of the latency measurement (tests inject a fake one).
        policy_seed: when set, torch's global generator is seeded with ``policy_seed + seed`` at each
            batch's reset (``seed``: its first episode's), so that a stochastic policy draws the same
            noise for the same episode under every mode and delay (common random numbers: paired
            comparisons between modes; with ``d = 0`` sync, async and rtc then coincide). None:
            torch's generator is left alone.
    """

    def __init__(self, env_meta, n_episodes: int = 50, n_envs: int = 1, max_steps: int = 400,
                 n_obs_steps: int = 2, n_action_steps: int = 8, seed_offset: int = TEST_SEED_OFFSET,
                 video_dir: str | os.PathLike | None = None, n_videos: int = 0, obs_keys=None,
                 camera_size: int | None = None, video_camera: str = "agentview", video_size: int = 128,
                 fps: int = 20, terminate_on_success: bool = True, mode: str = "sync", delay: int | str = 0,
                 execute_steps: int | None = None, ensemble_every: int = 1, ensemble_decay: float = 0.01,
                 control_freq: float | None = None, env_fn=None, clock=time.perf_counter,
                 policy_seed: int | None = None):
        if env_meta is None and env_fn is None:
            raise ValueError("env_meta: required unless env_fn is given")
        self.env_meta = _resolve_env_meta(env_meta)
        if n_episodes < 1 or n_envs < 1:
            raise ValueError(f"n_episodes ({n_episodes}) and n_envs ({n_envs}) must be >= 1")
        self.n_episodes, self.n_envs = int(n_episodes), int(min(n_envs, n_episodes))
        self.max_steps, self.n_obs_steps, self.n_action_steps = int(max_steps), int(n_obs_steps), int(n_action_steps)
        self.seed_offset = int(seed_offset)
        self.video_dir = Path(video_dir) if video_dir is not None else None
        self.n_videos = int(n_videos) if video_dir is not None else 0
        if obs_keys is None:
            from jumpflow.envs.sim import LOW_DIM_KEYS
            obs_keys = LOW_DIM_KEYS
        self.obs_keys = list(obs_keys)
        self.fps = fps
        self.mode, self.delay = check_mode(mode), _check_delay(delay)
        self.execute_steps = int(execute_steps) if execute_steps is not None else None      # None: auto
        self.ensemble_every, self.ensemble_decay = int(ensemble_every), float(ensemble_decay)
        ChunkScheduler(self.mode, self.execute_steps or self.n_action_steps, self.ensemble_every)   # validates
        self.control_freq = float(control_freq) if control_freq is not None else control_freq_of(self.env_meta)
        if self.control_freq <= 0:
            raise ValueError(f"control_freq: must be > 0, got {self.control_freq}")
        self.env_fn, self.clock = env_fn, clock
        self.policy_seed = None if policy_seed is None else int(policy_seed)
        self._env_kwargs = {"env_meta": self.env_meta, "obs_keys": self.obs_keys, "n_obs_steps": self.n_obs_steps,
                            "n_action_steps": self.n_action_steps, "max_steps": self.max_steps,
                            "camera_size": camera_size, "terminate_on_success": terminate_on_success,
                            "video_camera": video_camera, "video_size": video_size}
        self._venv = None
        if self.n_videos > 0:
            from jumpflow.envs.rendering import require_offscreen_rendering
            require_offscreen_rendering()

    # ------------------------------------------------------------------ envs
    def _make_venv(self):
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode

        from jumpflow.envs.gym_env import RobomimicGymEnv

        if self.env_fn is not None:
            fns = [self.env_fn] * self.n_envs
        else:
            fns = [functools.partial(RobomimicGymEnv, **self._env_kwargs) for _ in range(self.n_envs)]
        if self.n_envs == 1:
            return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        return gym.vector.AsyncVectorEnv(fns, context="spawn", shared_memory=True, daemon=True,
                                         autoreset_mode=AutoresetMode.DISABLED)

    def close(self) -> None:
        if getattr(self, "_venv", None) is not None:
            try:
                self._venv.close(terminate=True) if self.n_envs > 1 else self._venv.close()
            except Exception:  # noqa: BLE001, S110  (a dead worker cannot be closed twice; shutdown goes on)
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

    def run(self, policy, mode: str | None = None, delay: int | str | None = None) -> dict:
        """Run all episodes (``mode`` / ``delay``: this run's, default the constructor's).

        Returns ``{"success_rate", "mean_max_reward", "mean_episode_length", "latency_ms_p50",
        "latency_ms_p95", "n_episodes", "n_env_errors", "seeds", "videos", "episodes": [{"seed",
        "success", "max_reward", "length", "error", "periods", "stall_periods", "periods_to_success",
        "requests"}], "seconds", "mode", "requested_mode", "rtc_fallback", "delay", "delay_steps_p50",
        "delay_steps_max", "execute_steps" (an int, or ``"auto"``), "execute_steps_used" (the
        execution horizons that ran), "control_freq", "mean_periods_to_success",
        "mean_stall_periods"}``. ``mode`` is the execution mode that ran: ``rtc`` on a policy without
        ``supports_prefix`` runs ``async`` (``rtc_fallback`` true). On envs with behaviour modes each
        episode also has the env's ``mode`` (the behaviour committed to) and ``mode_switches``
        (see :mod:`jumpflow.eval.modes`). ``mean_periods_to_success``
        averages over successful episodes (None when none succeeded).
        """
        t_start = time.perf_counter()
        requested = check_mode(mode if mode is not None else self.mode)
        delay = _check_delay(delay if delay is not None else self.delay)
        source = ChunkSource(policy, requested, self.n_action_steps, self.n_obs_steps)
        mode = source.effective_mode
        if self._venv is None:
            self._venv = self._make_venv()
        n = self.n_envs
        episodes: list[dict] = []
        latencies: list[float] = []
        delays: list[int] = []
        horizons: list[int] = []
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
                if self.policy_seed is not None:
                    import torch
                    torch.manual_seed(self.policy_seed + seeds[0])
                done = ~active.copy()
                for j in range(m):           # a reset that failed ends that episode at once
                    if info.get("error") is not None and info["error"][j]:
                        done[j] = True
                        finals[j] = {"success": False, "max_reward": 0.0, "steps": 0, "error": str(info["error"][j]),
                                     "periods": 0, "periods_to_success": None, "requests": 0}
                self._run_batch(policy, source, mode, delay, obs, done, finals, latencies, delays, horizons)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001  (a worker died: its episodes fail, start fresh envs)
                for j in range(m):
                    if finals[j] is None:
                        finals[j] = {"success": False, "max_reward": 0.0, "steps": 0, "periods": 0,
                                     "periods_to_success": None, "requests": 0,
                                     "error": f"vector env failed: {type(e).__name__}: {e}"}
                self.close()
                self._venv = self._make_venv()
            if any(record):
                try:
                    frames = self._venv.call("pop_frames")
                except Exception:  # noqa: BLE001  (no frames from a dead worker: the video is skipped)
                    frames = [None] * n
                for j in range(m):
                    if record[j] and frames[j] is not None:
                        videos.append(self._write_video(frames[j], b0 + j, seeds[j]))
            for j in range(m):
                f = finals[j]
                episodes.append({"seed": seeds[j], "success": f["success"], "max_reward": f["max_reward"],
                                 "length": f["steps"], "error": f["error"], "periods": f["periods"],
                                 "stall_periods": f["periods"] - f["steps"],
                                 "periods_to_success": f["periods_to_success"], "requests": f["requests"],
                                 **{key: f[key] for key in _BEHAVIOUR_KEYS if key in f}})
        lat = np.asarray(latencies) if latencies else np.zeros(1)
        dl = np.asarray(delays) if delays else np.zeros(1)
        to_success = [e["periods_to_success"] for e in episodes if e["periods_to_success"] is not None]
        return {
            "success_rate": float(np.mean([e["success"] for e in episodes])),
            "mean_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
            "mean_episode_length": float(np.mean([e["length"] for e in episodes])),
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
            "n_episodes": len(episodes), "n_env_errors": int(sum(bool(e["error"]) for e in episodes)),
            "seeds": [self.seed_offset, self.seed_offset + self.n_episodes - 1],
            "videos": videos, "episodes": episodes, "seconds": time.perf_counter() - t_start,
            "mode": mode, "requested_mode": requested, "rtc_fallback": source.rtc_fallback, "delay": delay,
            "delay_steps_p50": float(np.percentile(dl, 50)), "delay_steps_max": int(dl.max()),
            "execute_steps": self.execute_steps if self.execute_steps is not None else "auto",
            "execute_steps_used": sorted(set(horizons)), "control_freq": self.control_freq,
            "mean_periods_to_success": float(np.mean(to_success)) if to_success else None,
            "mean_stall_periods": float(np.mean([e["stall_periods"] for e in episodes])),
        }

    def _run_batch(self, policy, source: ChunkSource, mode: str, delay, obs, done: np.ndarray, finals: list,
                   latencies: list, delays: list, horizons: list | None = None) -> None:
        """One batch of lock-step episodes under ``mode``; fills ``finals[j]`` as episodes end.

        Clock: ``T`` control periods, ``k`` executed steps (shared by the batch: all live envs
        have executed the same steps). A request at ``(T, k)`` calls the policy at once (the
        simulator is paused while it runs, so ``delay="measured"`` times the policy alone) and
        the chunk is delivered at period ``T + d``; until then the batch executes the current
        plan (``sync``: it waits) and stalls where the plan has run out.
        """
        import torch

        n = self.n_envs
        sched = ChunkScheduler(mode, self.execute_steps or self.n_action_steps, self.ensemble_every,
                               self.ensemble_decay)
        T = k = 0
        requests = 0
        pending = None                                    # (arrival period, chunk, k_req)
        last_d = delay if delay != "measured" else 1
        while not done.all():
            if pending is not None and T >= pending[0]:
                sched.receive(pending[1], pending[2], k)
                pending = None
            if self.execute_steps is None:
                sched.execute_steps = execution_horizon(mode, self.n_action_steps, last_d)
            if pending is None and sched.needs_request(k):
                d_commit = last_d if delay == "measured" else delay
                prefix = sched.committed(k, d_commit) if mode == "rtc" and source.supports_prefix else None
                obs_t = {key: torch.from_numpy(np.ascontiguousarray(obs[key])) for key in self.obs_keys}
                t0 = self.clock()
                chunk = source(obs_t, prefix)
                lat = self.clock() - t0
                latencies.append(lat * 1e3)
                if chunk.shape[0] != n:
                    raise ValueError(f"policy returned a batch of {chunk.shape[0]} chunks for {n} environments")
                d = delay_steps(lat, self.control_freq) if delay == "measured" else delay
                delays.append(d)
                last_d = d
                if self.execute_steps is None:
                    sched.execute_steps = execution_horizon(mode, self.n_action_steps, last_d)
                sched.mark_requested(k)
                requests += 1
                if horizons is not None:
                    horizons.append(sched.interval)
                if d == 0:
                    sched.receive(chunk, k, k)
                else:
                    pending = (T + d, chunk, k)
            # execute up to the next event (an arrival or a request), or stall until the arrival
            avail = sched.available(k)
            if pending is not None and (mode == "sync" or avail == 0):
                T = pending[0]                            # the robot waits for the chunk
                continue
            steps = min(avail, self.n_action_steps, max(1, sched.steps_to_request(k)))
            if pending is not None:
                steps = min(steps, pending[0] - T)
            T0, k0 = T, k
            obs, _, term, trunc, info = self._venv.step(sched.actions(k, steps))        # (n, steps, A)
            T, k = T + steps, k + steps
            ended = (np.asarray(term) | np.asarray(trunc)) & ~done
            for j in np.nonzero(ended)[0]:
                steps_j = int(info["steps"][j])
                periods = T0 + max(0, steps_j - k0)
                success = bool(info["success"][j])
                finals[j] = {"success": success, "max_reward": float(info["max_reward"][j]), "steps": steps_j,
                             "error": str(info["error"][j]), "periods": periods,
                             "periods_to_success": periods if success else None, "requests": requests}
                for key in _BEHAVIOUR_KEYS:                # tasks with behaviour modes (jumpflow.eval.modes)
                    if key in info:
                        v = info[key][j]
                        finals[j][key] = v.item() if hasattr(v, "item") else v
            done |= ended
