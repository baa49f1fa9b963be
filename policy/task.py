"""The policy workload: robomimic data -> ChunkPolicy -> closed-loop rollouts."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

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
        inference_steps: NFE of the policy at evaluation (null: the objective's default).
        eval_nfe: extra NFEs evaluated at the end (``[[steps, sampler-or-null], ...]``).
        eval_episodes, eval_envs, eval_max_steps, eval_videos: rollout settings.
        temporal_ensemble: see :class:`ChunkPolicy`.
    """

    def __init__(self, dataset: str, env: str = "Lift", n_demos: int = 200, demo_seed: int = 0,
                 generate_if_missing: bool = True, image: bool = False, obs_keys=("robot0_eef_pos",
                 "robot0_eef_quat", "robot0_gripper_qpos", "object"), horizon: int = 16, n_obs_steps: int = 2,
                 n_action_steps: int = 8, encoder: dict | None = None, filter_key: str | None = None,
                 inference_steps: int | None = 1, eval_episodes: int = 50, eval_envs: int = 1,
                 eval_max_steps: int = 400, eval_videos: int = 2, temporal_ensemble: float | None = None,
                 cache_dir: str | None = None):
        for name, v in (("horizon", horizon), ("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps),
                        ("eval_episodes", eval_episodes), ("eval_envs", eval_envs), ("n_demos", n_demos)):
            if int(v) < 1:
                raise ValueError(f"task.{name}: must be >= 1, got {v}")
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(f"task.horizon: {horizon} < n_obs_steps - 1 + n_action_steps")
        self.dataset_path = Path(dataset).expanduser()
        self.env, self.n_demos, self.demo_seed, self.image = env, int(n_demos), int(demo_seed), bool(image)
        self.obs_keys = list(obs_keys)
        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        self.encoder_kwargs = dict(encoder or {})
        self.filter_key, self.cache_dir = filter_key, cache_dir
        self.inference_steps = inference_steps
        self.eval_episodes, self.eval_envs = int(eval_episodes), int(eval_envs)
        self.eval_max_steps, self.eval_videos = int(eval_max_steps), int(eval_videos)
        self.temporal_ensemble = temporal_ensemble

        if not self.dataset_path.exists():
            if not generate_if_missing:
                raise FileNotFoundError(f"task.dataset: {self.dataset_path} does not exist "
                                        "(set task.generate_if_missing=true to generate expert demos)")
            from jumpflow.envs.demos import ensure_demos
            ensure_demos(self.dataset_path, task=env, n_demos=self.n_demos, seed=self.demo_seed, image=self.image)
        self._data = None
        data = self._dataset()
        meta = data.shape_meta()
        self.obs_shapes = {k: tuple(meta["obs"][k]) for k in self.obs_keys}
        self.action_dim = int(meta["action"][0])
        self.shape = (self.horizon, self.action_dim)
        self.cond_dim = self._probe_encoder().out_dim

    def _dataset(self):
        if self._data is None:
            from jumpflow.datasets.sequence import RobomimicSequenceDataset
            self._data = RobomimicSequenceDataset(self.dataset_path, self.obs_keys, horizon=self.horizon,
                                                  n_obs_steps=self.n_obs_steps, n_action_steps=self.n_action_steps,
                                                  filter_key=self.filter_key, cache_dir=self.cache_dir)
        return self._data

    def _probe_encoder(self):
        from jumpflow.policy.encoders import ObsEncoder
        return ObsEncoder(self.obs_shapes, self.n_obs_steps, **self.encoder_kwargs)

    def build_model(self, backbone: nn.Module, objective) -> nn.Module:
        from jumpflow.policy.chunk_policy import ChunkPolicy
        from jumpflow.policy.encoders import ObsEncoder

        encoder = ObsEncoder(self.obs_shapes, self.n_obs_steps, **self.encoder_kwargs)
        return ChunkPolicy(encoder, backbone, objective, self._dataset().get_normalizer(), self.horizon,
                           self.n_obs_steps, self.n_action_steps, self.action_dim, self.inference_steps,
                           self.temporal_ensemble)

    def train_dataset(self):
        return self._dataset()

    def evaluator(self, run_dir=None, n_episodes: int | None = None, n_videos: int | None = None):
        from jumpflow.eval.rollout import RolloutEvaluator
        n_videos = self.eval_videos if n_videos is None else n_videos
        return RolloutEvaluator(self._dataset().env_meta, n_episodes=n_episodes or self.eval_episodes,
                                n_envs=self.eval_envs, max_steps=self.eval_max_steps, n_obs_steps=self.n_obs_steps,
                                n_action_steps=self.n_action_steps, obs_keys=self.obs_keys,
                                video_dir=(Path(run_dir) / "videos") if run_dir is not None and n_videos else None,
                                n_videos=n_videos)

    def evaluate(self, model: nn.Module, run_dir, step: int) -> dict[str, float]:
        evaluator = self.evaluator(run_dir)
        try:
            result = evaluator.run(model)
        finally:
            evaluator.close()
        summary = {k: result[k] for k in ("success_rate", "mean_max_reward", "mean_episode_length",
                                          "latency_ms_p50", "latency_ms_p95", "n_env_errors")}
        if run_dir is not None:
            from jumpflow.checkpoint import atomic_write_text
            path = Path(run_dir) / f"eval_step{step}.json"
            atomic_write_text(path, json.dumps({"step": step, "nfe": model.inference_steps, **summary,
                                        "videos": result["videos"]}, indent=2))
        print(f"[eval step {step}] success {summary['success_rate']:.3f} over {result['n_episodes']} episodes, "
              f"latency p50 {summary['latency_ms_p50']:.2f} ms p95 {summary['latency_ms_p95']:.2f} ms per chunk "
              f"(nfe {model.inference_steps})", flush=True)
        return summary
