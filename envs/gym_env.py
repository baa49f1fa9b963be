"""A ``gymnasium.Env`` over a robomimic/robosuite task (or any sim
``jumpflow.envs.registry.make_sim`` builds from an ``env_meta``: jumpflow's planar BlockPush and
ReachAround) for chunked policies.

- Observations: ``{key: (n_obs_steps, D) float32}`` for low-dim keys and
  ``{key: (n_obs_steps, 3, H, W) uint8}`` (upright, channel-first) for ``*_image`` keys; the
  history repeats the first observation after a reset (as Diffusion Policy does).
- Actions: a chunk ``(n_action_steps, A)`` (or a single ``(A,)`` action), executed step by step;
  execution stops early at success when ``terminate_on_success``.
- ``info``: ``success`` (reached at any step so far), ``max_reward``, ``steps``, ``error``
  ("" or why the episode was cut: an exception in the simulator or a non-finite observation,
  which also ends the episode with ``terminated=True``); on tasks with behaviour modes (sims with
  ``current_mode()``, unless their ``tracks_modes`` is false) also ``mode`` (the mode committed so far, ``None`` before one is) and
  ``mode_switches`` (changes of the committed mode this episode).
- ``reset(seed=s)``: the initial state is a function of ``s`` only (see ``RobosuiteSim.reset``).
- After an episode ends, further ``step`` calls do nothing and return the last observation
  (for vector envs with autoreset disabled).
- Videos: set ``record = True`` before ``reset`` to keep a frame per control step from
  ``video_camera`` (``video_size``); take them with :meth:`pop_frames`.
"""

from __future__ import annotations

import collections
import traceback

import gymnasium as gym
import numpy as np


class RobomimicGymEnv(gym.Env):
    """Args:
        env_meta: robomimic ``env_args`` dict.
        obs_keys: observation keys for the policy (low-dim and/or ``<camera>_image``).
        n_obs_steps: observation history length.
        n_action_steps: actions executed per ``step``.
        max_steps: episode length cap in control steps (truncation).
        camera_size: image side for ``*_image`` keys (None: env_meta's ``camera_heights``).
        terminate_on_success: end the episode at the first success.
        video_camera, video_size: what :attr:`record` renders.
    """

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012  (gymnasium reads this class attribute)

    def __init__(self, env_meta: dict, obs_keys, n_obs_steps: int = 2, n_action_steps: int = 8,
                 max_steps: int = 400, camera_size: int | None = None, terminate_on_success: bool = True,
                 video_camera: str = "agentview", video_size: int = 128):
        from jumpflow.envs.registry import make_sim

        super().__init__()
        self.obs_keys = list(obs_keys)
        self.image_keys = [k for k in self.obs_keys if k.endswith("_image")]
        self.n_obs_steps, self.n_action_steps = int(n_obs_steps), int(n_action_steps)
        self.max_steps, self.terminate_on_success = int(max_steps), bool(terminate_on_success)
        self.video_camera, self.video_size = video_camera, int(video_size)
        self.render_mode = "rgb_array"
        self.sim = make_sim(env_meta, obs_keys=self.obs_keys, image_keys=self.image_keys,
                            camera_size=camera_size)
        # tasks with behaviour modes (the planar ones; Lift and Can's grasps) report the mode committed so far
        self._tracks_modes = bool(getattr(self.sim, "tracks_modes", hasattr(self.sim, "current_mode")))
        self.record = False
        self._frames: list[np.ndarray] = []
        self._history: collections.deque = collections.deque(maxlen=self.n_obs_steps)
        if hasattr(self.sim, "observe"):
            first = self.sim.observe()
        else:       # RobosuiteSim: the observation of the post-construction state
            first = self.sim._obs(self.sim.env._get_observations(force_update=True))
        spaces = {}
        for k in self.obs_keys:
            v = self._format(k, first[k])
            if v.dtype == np.uint8:
                spaces[k] = gym.spaces.Box(0, 255, (self.n_obs_steps,) + v.shape, np.uint8)
            else:
                spaces[k] = gym.spaces.Box(-np.inf, np.inf, (self.n_obs_steps,) + v.shape, np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        a = self.sim.action_dim
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.n_action_steps, a), np.float32)
        self._done = True
        self._last = None
        self._info = self._new_info()

    def _new_info(self) -> dict:
        info = {"success": False, "max_reward": 0.0, "steps": 0, "error": ""}
        if getattr(self, "_tracks_modes", False):
            info.update(mode=None, mode_switches=0)
        return info

    def _track_mode(self) -> None:
        """``info["mode"]``: the sim's committed mode; ``info["mode_switches"]``: how often it changed
        from one mode to another this episode (``None`` -> a mode is not a switch; the rule of
        ``jumpflow.eval.modes.mode_switches``)."""
        if not self._tracks_modes:
            return
        mode = self.sim.current_mode()
        last = self._info.get("mode")
        if mode is not None and last is not None and mode != last:
            self._info["mode_switches"] += 1
        if mode is not None:
            self._info["mode"] = mode

    def _format(self, key: str, v: np.ndarray) -> np.ndarray:
        if key.endswith("_image"):
            return np.ascontiguousarray(np.moveaxis(np.asarray(v, dtype=np.uint8), -1, 0))   # (3, H, W)
        return np.asarray(v, dtype=np.float32).reshape(-1)

    def _push(self, obs: dict) -> None:
        self._history.append({k: self._format(k, obs[k]) for k in self.obs_keys})

    def _stacked(self) -> dict:
        hist = list(self._history)
        while len(hist) < self.n_obs_steps:
            hist.insert(0, hist[0])
        return {k: np.stack([h[k] for h in hist]) for k in self.obs_keys}

    def _zeros(self) -> dict:
        return {k: np.zeros(s.shape, s.dtype) for k, s in self.observation_space.spaces.items()}

    def _finite(self, obs: dict) -> bool:
        return all(np.isfinite(v).all() for k, v in obs.items() if not k.endswith("_image"))

    def _frame(self) -> None:
        if self.record:
            self._frames.append(self.sim.render(self.video_camera, self.video_size, self.video_size))

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._info = self._new_info()
        self._frames = []
        self._history.clear()
        try:
            obs = self.sim.reset(seed=seed)
            if not self._finite(obs):
                raise FloatingPointError("non-finite observation after reset")
            self._push(obs)
            self._frame()
            self._track_mode()
            self._done = False
            self._last = self._stacked()
        except Exception as e:  # noqa: BLE001  (whatever a simulator raises, the evaluator counts a failed episode)
            self._info["error"] = f"reset failed: {type(e).__name__}: {e}"
            self._done = True
            self._last = self._zeros()
        return self._last, dict(self._info)

    def step(self, action):
        if self._done:
            return self._last, 0.0, True, False, dict(self._info)
        action = np.asarray(action, dtype=np.float64)
        if action.ndim == 1:
            action = action[None]
        action = action[: self.n_action_steps]
        reward = 0.0
        terminated = truncated = False
        for a in action:
            if not np.isfinite(a).all():
                self._info["error"] = "policy produced a non-finite action"
                terminated = True
                break
            try:
                obs, r, success = self.sim.step(np.clip(a, -1.0, 1.0))
            except Exception as e:  # noqa: BLE001  (any simulator error ends this episode, not the evaluation)
                self._info["error"] = f"simulator raised {type(e).__name__}: {e}"
                self._info["traceback"] = traceback.format_exc(limit=3)
                terminated = True
                break
            self._info["steps"] += 1
            if not self._finite(obs):
                self._info["error"] = "simulation diverged (non-finite observation)"
                terminated = True
                break
            self._push(obs)
            self._frame()
            self._track_mode()
            reward = max(reward, r)
            self._info["max_reward"] = max(self._info["max_reward"], r)
            self._info["success"] = self._info["success"] or success
            if success and self.terminate_on_success:
                terminated = True
                break
            if self._info["steps"] >= self.max_steps:
                truncated = True
                break
        if self._info["error"]:
            self._info["success"] = False
        self._done = terminated or truncated
        if not self._info["error"]:
            self._last = self._stacked()
        return self._last, float(reward), terminated, truncated, dict(self._info)

    def render(self):
        return self.sim.render(self.video_camera, self.video_size, self.video_size)

    def pop_frames(self) -> np.ndarray | None:
        """Recorded frames ``(T, H, W, 3)`` uint8 of the current/last episode (then cleared)."""
        if not self._frames:
            return None
        frames = np.stack(self._frames)
        self._frames = []
        return frames

    def close(self):
        self.sim.close()
