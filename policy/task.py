"""The policy workload: robomimic data -> ChunkPolicy -> closed-loop rollouts."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from jumpflow.envs.experts import STYLES as DEMO_STYLES  # ph | mh | dart (a numpy-only module)
from jumpflow.errors import ConfigError
from jumpflow.normalizer import Normalizer
from jumpflow.objectives.base import Inference
from jumpflow.tasks import Task


class PolicyTask(Task):
    """Train an action-chunk policy on a robomimic HDF5 and evaluate it in the simulator.

    Args:
        dataset: robomimic ``.hdf5`` path; generated with the scripted expert when missing and
            ``generate_if_missing`` (the embedded default of the main job).
        env: robosuite task of generated demos (``Lift``, ``PickPlaceCan``, ``NutAssemblySquare``).
        n_demos, demo_seed: generated demos and their first seed.
        image: generate image observations too (84x84 agentview + eye-in-hand).
        obs_keys: observation keys (low-dim and ``*_image``).
        horizon, n_obs_steps, n_action_steps: Diffusion Policy's 16 / 2 / 8.
        encoder: ``ObsEncoder`` kwargs (image_trunk, crop_size, ...).
        filter_key: ``mask/<filter_key>`` demos only (null: all).
        demo_style: ``ph`` (scripted, the default), ``mh`` (human-like, multimodal) or ``dart`` (ph
            labels executed with noise, recoveries included) generated demos.
        demo_workers: processes generating robosuite demos (the file does not depend on it).
        inference: sampling settings at evaluation (``steps``, ``sampler``, ``guidance``; missing
            ones: the objective's defaults, which live in the objective's config).
        eval_nfe: extra NFEs evaluated at the end (``[[steps, sampler-or-null], ...]``).
        eval_episodes, eval_envs, eval_max_steps, eval_videos: rollout settings.
        temporal_ensemble, prefix_max: see :class:`ChunkPolicy` (``prefix_max > 0``: real-time
            chunking by prefix conditioning, for the evaluator's ``rtc`` mode).
    """

    def __init__(self, dataset: str, env: str = "Lift", n_demos: int = 200, demo_seed: int = 0,
                 demo_style: str = "ph", generate_if_missing: bool = True, image: bool = False,
                 obs_keys=("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"), horizon: int = 16,
                 n_obs_steps: int = 2, n_action_steps: int = 8, encoder: dict | None = None,
                 filter_key: str | None = None, inference: dict | None = None, eval_episodes: int = 50,
                 eval_envs: int = 1, eval_max_steps: int = 400, eval_videos: int = 2,
                 temporal_ensemble: float | None = None, cache_dir: str | None = None, prefix_max: int = 0,
                 demo_workers: int = 1):
        for name, v in (("horizon", horizon), ("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps),
                        ("eval_episodes", eval_episodes), ("eval_envs", eval_envs), ("n_demos", n_demos),
                        ("eval_max_steps", eval_max_steps), ("demo_workers", demo_workers)):
            if int(v) < 1:
                raise ConfigError(name, f"must be >= 1, got {v}")
        if eval_videos < 0:
            raise ConfigError("eval_videos", f"must be >= 0, got {eval_videos}")
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ConfigError("horizon", f"{horizon} < n_obs_steps - 1 + n_action_steps")
        if demo_style not in DEMO_STYLES:
            raise ConfigError("demo_style", f"must be one of {', '.join(DEMO_STYLES)}, got {demo_style!r}")
        if temporal_ensemble is not None and not 0 < temporal_ensemble <= 1:
            raise ConfigError("temporal_ensemble", f"must be in (0, 1] or null, got {temporal_ensemble}")
        if not obs_keys:
            raise ConfigError("obs_keys", "must name at least one observation key")
        if not 0 <= prefix_max <= n_action_steps:
            raise ConfigError("prefix_max", f"must be in [0, n_action_steps={n_action_steps}], got {prefix_max}")
        self.prefix_max = int(prefix_max)
        self.inference = Inference.of(dict(inference or {}))          # checked against the objective later
        self.dataset_path = Path(dataset).expanduser()
        self.env, self.n_demos, self.demo_seed, self.image = env, int(n_demos), int(demo_seed), bool(image)
        self.demo_style, self.generate_if_missing = demo_style, bool(generate_if_missing)
        self.demo_workers = int(demo_workers)
        self.obs_keys = list(obs_keys)
        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        self.encoder_kwargs = dict(encoder or {})
        self.filter_key, self.cache_dir = filter_key, cache_dir
        self.eval_episodes, self.eval_envs = int(eval_episodes), int(eval_envs)
        self.eval_max_steps, self.eval_videos = int(eval_max_steps), int(eval_videos)
        self.temporal_ensemble = temporal_ensemble
        self._data = None
        self._normalizer: Normalizer | None = None
        self.obs_shapes: dict | None = None
        self.action_dim: int | None = None
        self.env_meta: dict | None = None
        self.shape, self.cond_dim = None, None
        self.demo_modes: list[str] | None = None

    # -- before data: a stand-in of the right rank for the backbone check ---------------------------
    @property
    def probe_shape(self) -> tuple[int, ...]:
        return (self.horizon, self.action_dim or 2)

    @property
    def probe_cond_dim(self) -> int:
        return self.cond_dim or 8

    # -- data -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Generate the demos when missing (and allowed), read them, fit the normalizer."""
        if not self.dataset_path.exists():
            if not self.generate_if_missing:
                raise FileNotFoundError(f"task.dataset: {self.dataset_path} does not exist "
                                        "(set task.generate_if_missing=true to generate expert demos)")
            from jumpflow.envs.demos import ensure_demos
            extra = {} if self.demo_style == "ph" else {"style": self.demo_style}
            ensure_demos(self.dataset_path, task=self.env, n_demos=self.n_demos, seed=self.demo_seed,
                         image=self.image, workers=self.demo_workers, **extra)
        self._check_oracle_version()
        data = self._dataset()
        from jumpflow.envs.registry import sim_class_path
        try:                                   # an env the evaluator cannot build fails here, not after training
            sim_class_path(data.env_meta)
        except (ValueError, TypeError) as err:
            raise ConfigError("task.dataset", f"{self.dataset_path}: data.attrs['env_args']: {err}") from None
        meta = data.shape_meta()
        self._set_shapes({k: tuple(meta["obs"][k]) for k in self.obs_keys}, int(meta["action"][0]), data.env_meta)
        self._normalizer = data.get_normalizer()
        self.demo_modes = self._read_demo_modes()

    def _check_oracle_version(self) -> None:
        """A planar task's demos written by another version of its oracle are refused before any
        training (an existing file is otherwise read as it is, whatever expert wrote it)."""
        from jumpflow.envs.planar_demos import check_oracle_version, is_planar_task

        if is_planar_task(self.env):
            try:
                check_oracle_version(self.dataset_path, self.env)
            except ValueError as err:
                raise ConfigError("task.dataset", str(err)) from None

    def _read_demo_modes(self) -> list[str] | None:
        """The demos' behaviour modes (``data/demo_i`` attribute ``mode``) when the file labels them
        (multimodal tasks, mh demos); ``None`` otherwise. Kept in the artifact for mode metrics."""
        import h5py

        with h5py.File(self.dataset_path, "r") as f:
            demos = list(f["data"].keys())
            if not demos or not all("mode" in f["data"][d].attrs for d in demos):
                return None
        from jumpflow.eval.modes import read_demo_modes
        return read_demo_modes(self.dataset_path, self.filter_key)

    def artifact(self) -> dict:
        return {**super().artifact(), "obs_keys": self.obs_keys,
                "obs_shapes": {k: list(v) for k, v in self.obs_shapes.items()}, "action_dim": self.action_dim,
                "env_meta": self.env_meta, "demo_modes": self.demo_modes}

    def restore(self, artifact: dict) -> None:
        self._set_shapes({k: tuple(v) for k, v in artifact["obs_shapes"].items()}, int(artifact["action_dim"]),
                         artifact["env_meta"])
        self.demo_modes = artifact.get("demo_modes")

    def _set_shapes(self, obs_shapes: dict, action_dim: int, env_meta: dict) -> None:
        self.obs_shapes, self.action_dim, self.env_meta = obs_shapes, action_dim, env_meta
        self.shape = (self.horizon, self.action_dim)
        from jumpflow.policy.chunk_policy import ChunkPolicy
        self.cond_dim = self._encoder().out_dim + ChunkPolicy.prefix_cond_dim(self.prefix_max, action_dim)

    def _dataset(self):
        if self._data is None:
            from jumpflow.datasets.sequence import RobomimicSequenceDataset
            self._data = RobomimicSequenceDataset(self.dataset_path, self.obs_keys, horizon=self.horizon,
                                                  n_obs_steps=self.n_obs_steps, n_action_steps=self.n_action_steps,
                                                  filter_key=self.filter_key, cache_dir=self.cache_dir)
        return self._data

    def _encoder(self):
        from jumpflow.policy.encoders import ObsEncoder
        return ObsEncoder(self.obs_shapes, self.n_obs_steps, **self.encoder_kwargs)

    def build_model(self, backbone: nn.Module, objective) -> nn.Module:
        """The policy; its normalizer is the fitted one after :meth:`prepare`, or an empty one that
        a checkpoint's state dict fills (after :meth:`restore`)."""
        from jumpflow.policy.chunk_policy import ChunkPolicy

        normalizer = self._normalizer if self._normalizer is not None else Normalizer()
        policy = ChunkPolicy(self._encoder(), backbone, objective, normalizer, self.horizon, self.n_obs_steps,
                             self.n_action_steps, self.action_dim, self.inference, self.temporal_ensemble,
                             self.prefix_max)
        policy.env_meta, policy.obs_keys = self.env_meta, list(self.obs_keys)
        return policy

    def train_dataset(self):
        return self._dataset()

    def evaluator(self, run_dir=None, n_episodes: int | None = None, n_videos: int | None = None,
                  max_steps: int | None = None, policy_seed: int | None = None):
        """The rollout evaluator of this task's settings; ``n_episodes``, ``n_videos`` and the episode
        limit ``max_steps`` replace the config's for this evaluator only (a bench's protocol);
        ``policy_seed`` seeds the policy's sampling noise per batch of episodes (``RolloutEvaluator``)."""
        from jumpflow.eval.rollout import RolloutEvaluator
        n_videos = self.eval_videos if n_videos is None else n_videos
        return RolloutEvaluator(self.env_meta, n_episodes=n_episodes or self.eval_episodes,
                                n_envs=self.eval_envs, max_steps=max_steps or self.eval_max_steps,
                                n_obs_steps=self.n_obs_steps,
                                n_action_steps=self.n_action_steps, obs_keys=self.obs_keys,
                                video_dir=(Path(run_dir) / "videos") if run_dir is not None and n_videos else None,
                                n_videos=n_videos, policy_seed=policy_seed)

    def mode_summary(self, result: dict) -> dict[str, float]:
        """``mode_entropy_ratio``, ``mode_tv``, ``mode_switches`` of an evaluator result on a task whose
        demos label modes (``{}`` otherwise), plus the rollouts' mode frequencies as ``mode_freq/<m>``."""
        episodes = result.get("episodes", [])
        if not self.demo_modes or not episodes or "mode" not in episodes[0]:
            return {}
        from jumpflow.eval.modes import mode_distribution, mode_metrics

        modes = [e.get("mode") for e in episodes]
        metrics = mode_metrics(modes, self.demo_modes, switches=[e.get("mode_switches", 0) for e in episodes])
        out = {k: float(metrics[k]) for k in ("mode_entropy_ratio", "mode_tv", "mode_switches", "n_no_mode")}
        out.update({f"mode_freq/{m}": p for m, p in mode_distribution(modes).items()})
        return out

    def evaluate(self, model: nn.Module, run_dir, step: int) -> dict[str, float]:
        evaluator = self.evaluator(run_dir)
        try:
            result = evaluator.run(model)
        finally:
            evaluator.close()
        summary = {k: result[k] for k in ("success_rate", "mean_max_reward", "mean_episode_length",
                                          "latency_ms_p50", "latency_ms_p95", "n_env_errors")}
        summary.update(self.mode_summary(result))
        if run_dir is not None:
            from jumpflow.io import atomic_write_text
            path = Path(run_dir) / f"eval_step{step}.json"
            atomic_write_text(path, json.dumps({"step": step, "nfe": model.inference_steps, **summary,
                                        "videos": result["videos"]}, indent=2))
        print(f"[eval step {step}] success {summary['success_rate']:.3f} over {result['n_episodes']} episodes, "
              f"latency p50 {summary['latency_ms_p50']:.2f} ms p95 {summary['latency_ms_p95']:.2f} ms per chunk "
              f"(nfe {model.inference_steps})", flush=True)
        return summary
