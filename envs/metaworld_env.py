"""MetaWorld (v3, Farama ``metaworld==3.0.0``) as a simulator family: ``env_meta["type"] == "metaworld"``.

Reference: MetaWorld (Yu et al. 2019; Farama's v3 release), used as a 50-task benchmark by the
one-step / consistency policy papers built on 3D Diffusion Policy (DP3), which group the tasks by
difficulty after Seo et al. 2022 (Masked World Models): :data:`TASK_GROUPS`, :data:`TASK_SET`.
MetaWorld is a dependency (``pip install metaworld==3.0.0 packaging``, the ``sim`` extra); nothing of
it is copied here.

``env_meta``::

    {"env_name": "push-v3", "type": "metaworld", "env_version": <metaworld version>,
     "env_kwargs": {"goal_observable": true, "reward_function_version": "v2", "horizon": 500,
                    "camera_size": 84, "control_freq": 80.0}}

``env_kwargs``: ``goal_observable`` (True: the last 3 entries of ``state`` hold the goal position,
as in MetaWorld's MT1 benchmark and DP3; MetaWorld's scripted policies read it there, so they need
it), ``reward_function_version`` (MetaWorld's, ``"v2"``), ``horizon`` (MetaWorld's
``max_path_length``, 500: stepping beyond it raises), ``camera_size`` (side of image observations),
``control_freq`` (informative, for ``delay="measured"``; must be MetaWorld's ``1 / (timestep *
frame_skip)`` = 80 Hz).

Observation keys (float64): ``state`` (39): MetaWorld's own observation (hand position 3, gripper
opening 1, object block 14 = up to two objects' position + quaternion, zero padded, the same 18 of
the previous control step, goal position 3); the split of its current frame: ``hand_pos`` (3),
``gripper`` (1), ``obj_state`` (14), ``goal_pos`` (3). Image keys ``<camera>_image``
(``camera_size`` square, uint8, the raw MuJoCo render of MetaWorld's camera: ``corner2`` looks at
the table from the front-right and is upright, ``corner`` comes out upside down as MetaWorld
defines it), cameras :data:`CAMERAS`; ``agentview`` (the evaluator's default video camera) is an
alias of ``corner2``.

Action: ``(4,)`` in ``[-1, 1]``: ``[:3]`` moves the hand's mocap target by ``0.01 m`` per unit per
control step (MetaWorld's ``action_scale``), clipped to the task's mocap box; ``[3]`` is the gripper
effort (``-1`` open, ``+1`` close). One control step is 5 physics steps of 2.5 ms (80 Hz).

Success: MetaWorld's ``info["success"]`` of the last step (``is_success()`` is False right after a
reset, before any step). Reward: MetaWorld's shaped reward (0..10).

Resets: ``reset(seed)`` draws MetaWorld's random reset vector (object / goal positions, the task's
``_random_reset_space``, with the task's own rejection loops) from MetaWorld's seeded generator
``seeding.np_random(seed)``, so the initial state is a function of the seed only (a continuous
distribution: not MT1's fixed 50 goals). State (``get_state()``, the ``states`` rows of a demo
file)::

    [time, qpos (nq), qvel (nv), mocap_pos (3), mocap_quat (4), prev_frame (18), path_length (1),
     rand_vec (k)]

``prev_frame`` is the previous step's 18-d frame (MetaWorld frame-stacks it into ``state``) and
``rand_vec`` the task's reset vector (``k`` = 3..9 by task). ``reset_to(state)`` re-runs MetaWorld's
reset with ``rand_vec`` frozen (which rebuilds everything the task derives from it: object and goal
sites moved in the model, ``obj_init_pos``, ``_target_pos``, ``init_tcp``, reward constants), then
writes the dynamic state; ``reset(seed)`` goes through ``reset_to`` itself, so replaying a demo's
actions from its ``states[0]`` is bitwise the same computation as the original episode, on every
task. A mid-episode state resumes with MuJoCo's solver warm-start of the reset, not of the original
step: the continuation agrees to solver tolerance, not bitwise.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import ClassVar

import numpy as np

from jumpflow.envs.mujoco_sim import MujocoSim
from jumpflow.envs.rendering import select_gl_backend

select_gl_backend()          # MuJoCo reads MUJOCO_GL when it is first imported

import mujoco

METAWORLD_TYPE = "metaworld"     # env_meta["type"]
PREFIX = "metaworld:"            # jumpflow-demos --task metaworld:push-v3

# Difficulty groups of the 50 v3 tasks (Seo et al. 2022, Masked World Models, appendix; the split
# DP3 and the one-step policy papers built on it report by): 28 easy, 11 medium, 6 hard, 5 very hard.
_MEDIUM = ("basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer", "peg-insert-side",
           "push-wall", "soccer", "sweep", "sweep-into")
_HARD = ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back")
_VERY_HARD = ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall")
GROUPS = ("easy", "medium", "hard", "very_hard")

# jumpflow's MetaWorld task set: 14 tasks spanning the four groups (the benchmark's rows)
TASK_SET: dict[str, str] = {
    "button-press-v3": "easy", "drawer-close-v3": "easy", "reach-v3": "easy", "window-open-v3": "easy",
    "basketball-v3": "medium", "hammer-v3": "medium", "push-wall-v3": "medium", "sweep-v3": "medium",
    "assembly-v3": "hard", "pick-out-of-hole-v3": "hard", "push-v3": "hard",
    "disassemble-v3": "very_hard", "shelf-place-v3": "very_hard", "stick-pull-v3": "very_hard",
}

CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")
CAMERA_ALIASES = {"agentview": "corner2"}
DEFAULT_CAMERA = "corner2"
LOWDIM_KEYS = ("state", "hand_pos", "gripper", "obj_state", "goal_pos")
FRAME = 18                       # hand 3 + gripper 1 + objects 14: one frame of MetaWorld's observation


def task_names() -> list[str]:
    """The 50 MetaWorld v3 task names (from the installed MetaWorld)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    return sorted(ALL_V3_ENVIRONMENTS)


def task_group(name: str) -> str:
    """Difficulty group of a v3 task (``"easy"`` / ``"medium"`` / ``"hard"`` / ``"very_hard"``)."""
    base = check_task_name(name).removesuffix("-v3")
    if base in _VERY_HARD:
        return "very_hard"
    if base in _HARD:
        return "hard"
    return "medium" if base in _MEDIUM else "easy"


def looks_like_metaworld(task: str) -> bool:
    """Whether ``task`` is meant as a MetaWorld task (``metaworld:<name>`` or ``<name>-v<k>``), without
    importing MetaWorld; :func:`check_task_name` then validates it."""
    task = str(task)
    return task.startswith(PREFIX) or re.fullmatch(r"[a-z][a-z-]*-v\d+", task) is not None


def check_task_name(task: str) -> str:
    """Canonical MetaWorld task name (``"metaworld:push-v3"`` -> ``"push-v3"``).

    Raises:
        ValueError: one line naming the task and listing the valid names.
    """
    name = str(task).removeprefix(PREFIX)
    valid = task_names()
    if name not in valid:
        raise ValueError(f"unknown MetaWorld task {name!r}; valid: {', '.join(valid)}")
    return name


def metaworld_version() -> str:
    from importlib.metadata import version
    return version("metaworld")


DEFAULT_KWARGS: dict = {"goal_observable": True, "reward_function_version": "v2", "horizon": 500,
                        "camera_size": 84, "control_freq": 80.0}


def metaworld_env_meta(task: str, **env_kwargs) -> dict:
    """``env_meta`` of a MetaWorld task, ``env_kwargs`` overriding :data:`DEFAULT_KWARGS`."""
    name = check_task_name(task)
    unknown = sorted(set(env_kwargs) - set(DEFAULT_KWARGS))
    if unknown:
        raise ValueError(f"{name}: env_kwargs {unknown} are unknown; valid: {sorted(DEFAULT_KWARGS)}")
    return {"env_name": name, "type": METAWORLD_TYPE, "env_version": metaworld_version(),
            "env_kwargs": {**DEFAULT_KWARGS, **env_kwargs}}


class MetaWorldSim(MujocoSim):
    """One MetaWorld v3 task behind jumpflow's sim interface (see the module docstring).

    Args:
        env_meta: ``{"env_name": "<task>-v3", "type": "metaworld", "env_kwargs"}`` (dict or JSON).
        obs_keys: keys returned by ``reset`` / ``step`` (None: all low-dim keys, plus the images asked for).
        image_keys: ``<camera>_image`` keys rendered every step (cameras: :data:`CAMERAS`).
        camera_size: image side (None: ``env_kwargs["camera_size"]``).
        env_kwargs_override: replaces entries of ``env_meta["env_kwargs"]``.
        model_seed: accepted for interface parity with ``RobosuiteSim``; unused.
    """

    IMAGE_KEYS = tuple(f"{c}_image" for c in CAMERAS)
    LOWDIM_KEYS = LOWDIM_KEYS
    DEFAULT_KWARGS: ClassVar[dict] = DEFAULT_KWARGS
    DEFAULT_CAMERA = DEFAULT_CAMERA
    CAMERA_ALIASES: ClassVar[dict] = CAMERA_ALIASES

    def __init__(self, env_meta: dict | str, obs_keys=None, image_keys=(), camera_size: int | None = None,
                 env_kwargs_override: dict | None = None, model_seed: int = 0):
        if isinstance(env_meta, str):
            env_meta = json.loads(env_meta)
        if env_meta.get("type") != METAWORLD_TYPE:
            raise ValueError(f"env_meta type {env_meta.get('type')!r} is not {METAWORLD_TYPE!r}")
        name = check_task_name(env_meta.get("env_name"))          # before anything is built
        self._configure(name, env_meta, obs_keys, image_keys, camera_size, env_kwargs_override)

        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.env = ALL_V3_ENVIRONMENTS[name](reward_function_version=str(self.kwargs["reward_function_version"]))
        self._opened()
        env = self.env
        freq = 1.0 / (env.model.opt.timestep * env.frame_skip)
        if abs(float(self.kwargs["control_freq"]) - freq) > 1e-6:
            raise ValueError(f"{name}: env_kwargs control_freq is {self.kwargs['control_freq']}, but MetaWorld "
                             f"steps at {freq:g} Hz (timestep {env.model.opt.timestep} x frame_skip {env.frame_skip})")
        # MetaWorld's goal-observable setting (as its MT1 benchmark sets it through set_task)
        env._partially_observable = not bool(self.kwargs["goal_observable"])
        with contextlib.suppress(AttributeError):
            del env.sawyer_observation_space          # a cached property: recomputed for the new setting
        env._set_task_called = True
        env.max_path_length = int(self.kwargs["horizon"])
        self._rand_dim = int(env._random_reset_space.low.size)
        self._success = False
        self._info: dict = {}
        self._obs = np.zeros(2 * FRAME + 3)
        self.reset(seed=0)

    # ------------------------------------------------------------------ basics
    @property
    def action_dim(self) -> int:
        return 4

    @property
    def model(self):
        return self.env.model

    @property
    def data(self):
        return self.env.data

    @property
    def state_dim(self) -> int:
        m = self.env.model
        return 1 + m.nq + m.nv + 7 * m.nmocap + FRAME + 1 + self._rand_dim

    @property
    def state_layout(self) -> tuple[tuple[str, int], ...]:
        m = self.env.model
        return (("time", 1), ("qpos", m.nq), ("qvel", m.nv), ("mocap_pos", 3 * m.nmocap),
                ("mocap_quat", 4 * m.nmocap), ("prev_frame", FRAME), ("path_length", 1), ("rand_vec", self._rand_dim))

    def get_model_xml(self) -> str:
        """``""``: the scene is MetaWorld's own model file (per-episode changes follow from ``rand_vec``)."""
        return ""

    # ------------------------------------------------------------------ state
    def get_state(self) -> np.ndarray:
        """``(S,)`` float64, laid out as :attr:`state_layout`."""
        d = self.env.data
        return np.concatenate([[d.time], d.qpos, d.qvel, d.mocap_pos.ravel(), d.mocap_quat.ravel(),
                               self._obs[FRAME: 2 * FRAME], [self.env.curr_path_length],
                               np.asarray(self.env._last_rand_vec, dtype=np.float64)]).astype(np.float64)

    def _split(self, state: np.ndarray) -> dict:
        out, i = {}, 0
        for key, n in self.state_layout:
            out[key] = state[i: i + n]
            i += n
        return out

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> dict:
        """Set the simulator to a stored state row and return its observation (``model_xml`` ignored)."""
        state = self._check_state(state, ", ".join(f"{k} ({n})" for k, n in self.state_layout))
        s = self._split(state)
        env, m = self.env, self.env.model
        # MetaWorld's own reset with the reset vector frozen rebuilds what the task derives from it
        env._freeze_rand_vec = True
        env.seeded_rand_vec = False
        env._last_rand_vec = s["rand_vec"].copy()
        env.reset()
        d = env.data
        d.time = s["time"][0]
        d.qpos[:] = s["qpos"]
        d.qvel[:] = s["qvel"]
        d.mocap_pos[:] = s["mocap_pos"].reshape(m.nmocap, 3)
        d.mocap_quat[:] = s["mocap_quat"].reshape(m.nmocap, 4)
        env.curr_path_length = round(s["path_length"][0])
        env._did_see_sim_exception = False
        mujoco.mj_forward(m, d)
        curr = env._get_curr_obs_combined_no_goal()
        goal = env._get_pos_goal() if not env._partially_observable else np.zeros(3)
        env._prev_obs = np.array(curr, dtype=np.float64)           # what MetaWorld frame-stacks next
        self._obs = np.hstack([curr, s["prev_frame"], goal]).astype(np.float64)
        self._success, self._info = False, {}
        return self.observe()

    def reset(self, seed: int | None = None) -> dict:
        """Reset to the initial state drawn from ``seed`` (MetaWorld's seeded reset vector); returns the observation."""
        from gymnasium.utils import seeding

        env = self.env
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.np_random, _ = seeding.np_random(None if seed is None else int(seed) % (2 ** 63))
        obs, _ = env.reset()
        state = self.get_state()
        prev = 1 + env.model.nq + env.model.nv + 7 * env.model.nmocap
        state[prev: prev + FRAME] = obs[:FRAME]          # at a reset the previous frame is the current one
        return self.reset_to(state)

    # ------------------------------------------------------------------ stepping
    def step(self, action: np.ndarray):
        """One control step (12.5 ms). Returns ``(obs, reward, success)``."""
        action = self._check_action(action)
        if self.env.curr_path_length >= self.env.max_path_length:
            raise ValueError(f"{self.name}: episode is over ({self.env.max_path_length} steps, env_kwargs horizon); "
                             "reset first")
        obs, reward, _, _, info = self.env.step(action)
        self._obs = np.asarray(obs, dtype=np.float64)
        self._info = dict(info)
        self._success = bool(info.get("success", 0.0))
        return self.observe(), float(reward), self._success

    def is_success(self) -> bool:
        return self._success

    def success_info(self) -> dict:
        """MetaWorld's ``info`` of the last step (``{}`` after a reset)."""
        return dict(self._info)

    # ------------------------------------------------------------------ observations
    def _lowdim(self) -> dict:
        o = self._obs
        return {"state": o.copy(), "hand_pos": o[0:3].copy(), "gripper": o[3:4].copy(), "obj_state": o[4:FRAME].copy(),
                "goal_pos": o[2 * FRAME:].copy()}

    def _image_camera(self, key: str) -> str:
        return key.removesuffix("_image")

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self.env.close()


# ---------------------------------------------------------------------------- scripted experts
class MetaWorldExpert:
    """MetaWorld's own scripted policy of a task (``metaworld.policies.ENV_POLICY_MAP``), acting on
    jumpflow observations (the ``state`` key), with optional Gaussian action noise.

    ``reset(seed)`` reseeds the noise (``np.random.default_rng([seed, 1])``); ``act(obs) -> (4,)``
    is the policy's action plus ``N(0, noise_std^2)`` per entry (the caller clips to ``[-1, 1]``).
    """

    NOISE_STREAM = 1

    def __init__(self, task: str, noise_std: float = 0.0, seed: int | None = None):
        import warnings

        from metaworld.policies import ENV_POLICY_MAP

        self.task = check_task_name(task)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)
        self.policy = ENV_POLICY_MAP[self.task]()
        # MetaWorld's move() warns on every call whose gain saturates the action; the env clips anyway
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
        self.reset(seed)

    def reset(self, seed=None) -> None:
        self.rng = np.random.default_rng(None if seed is None else [*np.atleast_1d(seed).tolist(), self.NOISE_STREAM])

    def act(self, obs) -> np.ndarray:
        state = obs["state"] if isinstance(obs, dict) else obs
        a = np.asarray(self.policy.get_action(np.asarray(state, dtype=np.float64)), dtype=np.float64)
        if self.noise_std > 0:
            a = a + self.rng.normal(0.0, self.noise_std, size=a.shape)
        return a


class MetaWorldExpertPolicy:
    """A task's scripted expert as a ``predict_action`` policy for the rollout evaluator: reads the
    last step of ``obs_dict["state"]`` (``(B, n_obs_steps, 39)``), returns ``(B, 1, 4)``. Use with
    ``n_action_steps = 1`` (the expert is closed-loop) and ``obs_keys`` containing ``state``."""

    def __init__(self, task: str, noise_std: float = 0.0, seed: int = 0):
        self.experts: list[MetaWorldExpert] = []
        self.task, self.noise_std, self.seed, self.episodes = check_task_name(task), float(noise_std), int(seed), 0

    def reset(self) -> None:
        self.experts = []

    def predict_action(self, obs_dict: dict) -> np.ndarray:
        state = obs_dict["state"]
        state = np.asarray(state.detach().cpu() if hasattr(state, "detach") else state)
        b = state.shape[0]
        while len(self.experts) < b:
            self.experts.append(MetaWorldExpert(self.task, self.noise_std, seed=[self.seed, self.episodes]))
            self.episodes += 1
        return np.stack([self.experts[i].act(state[i, -1]) for i in range(b)])[:, None].astype(np.float32)
