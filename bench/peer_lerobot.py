"""Peer baseline: LeRobot's ``DiffusionPolicy`` trained and evaluated on jumpflow's data, budget and
evaluator, beside jumpflow's own rows of ``bench/policy.py``.

What is LeRobot's and what is jumpflow's:

- LeRobot's (``lerobot`` 0.4.x, used as a dependency, none of its code copied): the model
  (``DiffusionPolicy`` -> ``DiffusionModel``: the conditional 1-D UNet with FiLM, built from a
  ``DiffusionConfig`` with ``input_features`` / ``output_features``), its noise scheduler (diffusers'
  ``DDPMScheduler`` / ``DDIMScheduler``: squared-cosine betas, 100 training steps, epsilon prediction,
  samples clipped to [-1, 1]), its loss (``DiffusionPolicy.forward``) and its sampler
  (``DiffusionModel.generate_actions``). With ``--optim lerobot`` also its optimiser and LR schedule
  presets (``DiffusionConfig.get_optimizer_preset`` / ``get_scheduler_preset``: Adam lr 1e-4, wd 1e-6,
  cosine with 500 warm-up steps, grad-norm clip 10, no EMA).
- jumpflow's: the data (the same robomimic HDF5, the same ``(obs[n_obs_steps], action[horizon])``
  windows with Diffusion Policy's edge padding, read by ``jumpflow.datasets``; the same batches in
  the same order: the trainer's ``GlobalBatchSampler`` with the same seed), the normalisation (the
  task's fitted per-key min/max map to [-1, 1], which is LeRobot's ``MIN_MAX`` mode), the budget
  (steps, batch size), the recipe's optimiser / LR schedule / EMA with ``--optim jumpflow`` (the
  default: AdamW, warm-up + cosine, grad clip, EMA with DP's power warm-up, all read from the composed
  ``experiment=policy_cpu`` config like jumpflow's rows), Diffusion Policy's checkpoint protocol (the
  last 5 checkpoints, every tenth of training, each rolled out on the same test seeds) and the rollout
  evaluator (``jumpflow.eval.rollout``) through :class:`LeRobotDPAdapter`'s ``predict_action``.

Batches in LeRobot's format (:func:`to_lerobot_batch`): ``observation.state`` (proprioceptive keys:
``robot*`` / ``agent*``), ``observation.environment_state`` (the other keys: object, goal; LeRobot's
DP needs images or an environment state), both ``(B, n_obs_steps, D)``; ``action`` ``(B, horizon, A)``;
``action_is_pad`` ``(B, horizon)`` and ``observation.*_is_pad`` ``(B, n_obs_steps)``: true where the
window repeats an episode's first / last step, as ``LeRobotDataset`` marks them. The UNet's global
condition is the concatenated normalised history, as in jumpflow's low-dim encoder.

LeRobot pins an older torch (0.4.4: ``torch<2.11``), so it lives in its own virtual environment with
jumpflow installed there without dependencies; this script runs in that environment, from outside
the repository root (a bare ``datasets/`` folder on ``sys.path`` would hide Hugging Face's
``datasets``, which LeRobot imports)::

    python -m venv /work/venvs/lerobot
    /work/venvs/lerobot/bin/pip install lerobot==0.4.4
    /work/venvs/lerobot/bin/pip install "mujoco==3.9.0" "zarr>=3,<4" h5py "hydra-core>=1.3,<1.4" omegaconf \\
        numba scipy matplotlib "robosuite==1.4.1"
    /work/venvs/lerobot/bin/pip install --no-deps "robomimic==0.3.0"    # the robosuite tasks' env path
    /work/venvs/lerobot/bin/pip install --no-deps -e /work/main
    cd /tmp && OMP_NUM_THREADS=1 /work/venvs/lerobot/bin/python /work/main/bench/peer_lerobot.py \\
        --tasks reach_around_lowdim --seeds 0 --steps 1000

A task whose action window LeRobot's UNet cannot take (Block Push's 2-step ``h2`` window against
the 8 that three stages need) is refused in one line unless ``--pad-horizon``: then the window is
padded by repeating its last action to the next multiple, as LeRobot and Diffusion Policy pad an
episode's end (marked ``action_is_pad``, trained on unless ``--lerobot-option
do_mask_loss_for_padding=true``: masked, the added steps' outputs would be untrained while the
sampler still feeds them back through the UNet's convolutions), and the sampler's chunk is cropped
back to the task's window (variant ``..._pad8``). Such a seed takes hours on a CPU: ``--run-dir`` keeps
its checkpoints and each checkpoint's rollouts, and ``--resume`` continues where it was stopped::

    cd /tmp && OMP_NUM_THREADS=1 /work/venvs/lerobot/bin/python /work/main/bench/peer_lerobot.py \\
        --tasks block_push_lowdim --seeds 0 --steps 8000 --pad-horizon --run-dir /work/persist/peer_runs --resume

Rows (``objective: lerobot_dp``, ``sampler`` ddpm at 100 NFE and ddim at 10, ``variant`` naming the
UNet size and optimiser recipe, the fields of jumpflow's rows plus ``params``, ``down_dims``, ``optim``,
``lerobot``) go into ``bench/results/policy.json`` beside jumpflow's own rows (keyed as
``bench.common.row_key`` keys them, so either bench re-running keeps the other's rows); a table
prints them beside jumpflow's rows of the same task.
This module imports without LeRobot (the batch conversion is tested in the default suite).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

if __name__ == "__main__":
    # as a script, neither bench/ (its profile.py hides the standard library's, which torch imports)
    # nor the repository root (its datasets/ hides Hugging Face's, which LeRobot imports) on sys.path
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (_here, _here.parent)]

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

try:
    from bench.common import (
        RESULTS,
        config_keeping,
        demo_style_recipe,
        dp_protocol_conflict,
        load_rows,
        machine,
        print_table,
        rollout_limit,
        row_key,
        write_results,
    )
except ImportError:        # run as a file from outside the repository root (the lerobot venv)
    _spec = importlib.util.spec_from_file_location("_bench_common", Path(__file__).with_name("common.py"))
    _common = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_common)
    RESULTS, load_rows, machine = _common.RESULTS, _common.load_rows, _common.machine
    print_table, write_results = _common.print_table, _common.write_results
    config_keeping, row_key = _common.config_keeping, _common.row_key
    demo_style_recipe, rollout_limit = _common.demo_style_recipe, _common.rollout_limit
    dp_protocol_conflict = _common.dp_protocol_conflict

OBJECTIVE = "lerobot_dp"
OBS_STATE, OBS_ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"
#: observation keys that go to ``observation.state`` (the rest: ``observation.environment_state``)
STATE_PREFIXES = ("robot", "agent", "effector", "eef", "joint", "gripper", "proprio")
#: (sampler, NFE): DDPM at its 100 training steps, DDIM at 10 (the rows of ``bench/policy.py``)
VARIANTS = [("ddpm", 100), ("ddim", 10)]
DP_CHECKPOINTS = 5
#: the UNet sized for 2 CPU cores (jumpflow's ``UNet1D-S``); LeRobot's default is (512, 1024, 2048)
CPU_DOWN_DIMS = (64, 128, 256)


# ---------------------------------------------------------------------------- batch conversion
def split_obs_keys(obs_keys, env_state_keys=None) -> tuple[list[str], list[str]]:
    """``(state_keys, env_state_keys)``: proprioception (``robot*``, ``agent*``, ...) and the rest.

    LeRobot's DP takes ``observation.state`` and, without cameras, needs
    ``observation.environment_state`` too; both are concatenated into the UNet's condition, so the
    split only names the parts. ``env_state_keys`` overrides the rule."""
    obs_keys = list(obs_keys)
    if env_state_keys is None:
        env = [k for k in obs_keys if not k.lower().startswith(STATE_PREFIXES)]
    else:
        unknown = [k for k in env_state_keys if k not in obs_keys]
        if unknown:
            raise ValueError(f"env_state_keys {unknown} are not observation keys {obs_keys}")
        env = [k for k in obs_keys if k in env_state_keys]
    state = [k for k in obs_keys if k not in env]
    if not state or not env:
        raise ValueError(f"observation keys {obs_keys} split into state {state} and environment state {env}: "
                         "LeRobot's low-dim DP needs both; name the environment-state keys with --env-state-keys")
    return state, env


def window_pad_masks(indices: np.ndarray, horizon: int, n_obs_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(action_is_pad (W, horizon), obs_is_pad (W, n_obs_steps))`` bool for rows of a window table
    (``jumpflow.datasets.sequence.create_indices``: ``buffer_start, buffer_end, sample_start,
    sample_end``): a position is padding when it lies outside ``[sample_start, sample_end)``, i.e.
    it repeats the episode's first or last step."""
    idx = np.asarray(indices).reshape(-1, 4)
    pos = np.arange(horizon)[None, :]
    pad = (pos < idx[:, 2:3]) | (pos >= idx[:, 3:4])
    return pad, pad[:, :n_obs_steps].copy()


def lerobot_horizon(horizon: int, down_dims, pad: bool = False) -> int:
    """The action horizon LeRobot's UNet is built with for a task of ``horizon`` steps.

    ``DiffusionConfig`` refuses a horizon that is not a multiple of ``2 ** len(down_dims)`` (its
    stages halve the sequence). Such a task is refused here in one line before anything is trained,
    unless ``pad``: then the next multiple, the extra steps repeating the window's last action
    (:func:`pad_action_window`), as jumpflow's own ``backbone.pad_horizon`` pads its UNet1D's chunk."""
    horizon, factor = int(horizon), 2 ** len(tuple(down_dims))
    if horizon % factor == 0:
        return horizon
    if not pad:
        raise ValueError(f"the task's horizon {horizon} is not a multiple of LeRobot's UNet downsampling {factor} "
                         f"(2 ** len(down_dims), down_dims {list(down_dims)}): pass --pad-horizon to pad the "
                         f"action window to {-(-horizon // factor) * factor} steps")
    return -(-horizon // factor) * factor


def pad_action_window(action, action_is_pad, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend ``action (B, H, A)`` to ``(B, horizon, A)`` by repeating its last step (as an episode's
    end is padded), and ``action_is_pad (B, H)`` to ``(B, horizon)`` with the added steps marked as
    padding (``True``, so that LeRobot's ``do_mask_loss_for_padding``, when set, leaves them out of the
    loss). ``horizon == H`` returns the inputs as tensors."""
    action = torch.as_tensor(action)
    is_pad = torch.as_tensor(action_is_pad, dtype=torch.bool)
    extra = int(horizon) - action.shape[1]
    if extra < 0:
        raise ValueError(f"pad_action_window: horizon {horizon} is shorter than the window's {action.shape[1]} steps")
    if extra == 0:
        return action, is_pad
    action = torch.cat([action, action[:, -1:].expand(-1, extra, -1)], dim=1)     # (B, horizon, A)
    is_pad = torch.cat([is_pad, is_pad.new_ones(is_pad.shape[0], extra)], dim=1)  # (B, horizon)
    return action, is_pad


def to_lerobot_batch(obs: dict, action, normalizer, state_keys, env_keys, action_is_pad=None,
                     obs_is_pad=None) -> dict:
    """jumpflow window batch -> LeRobot DP batch (normalised with jumpflow's fitted normalizer).

    Args:
        obs: ``{key: (B, n_obs_steps, D)}`` raw low-dim observations (tensors or arrays).
        action: ``(B, horizon, A)`` raw actions, or ``None`` at inference.
        normalizer: the task's :class:`jumpflow.normalizer.Normalizer` (``limits``: [-1, 1]).
        state_keys, env_keys: see :func:`split_obs_keys`.
        action_is_pad, obs_is_pad: ``(B, horizon)`` / ``(B, n_obs_steps)`` bool (see
            :func:`window_pad_masks`); required with ``action``.
    Returns:
        ``{"observation.state", "observation.environment_state"}`` float32 ``(B, n_obs_steps, D)``,
        plus, with ``action``: ``"action"`` ``(B, horizon, A)``, ``"action_is_pad"``,
        ``"observation.state_is_pad"``, ``"observation.environment_state_is_pad"``.
    """
    def part(keys):
        return torch.cat([torch.as_tensor(normalizer.normalize(k, torch.as_tensor(obs[k]))).float() for k in keys],
                         dim=-1)
    batch = {OBS_STATE: part(state_keys), OBS_ENV_STATE: part(env_keys)}
    if action is not None:
        if action_is_pad is None or obs_is_pad is None:
            raise ValueError("to_lerobot_batch: action_is_pad and obs_is_pad are required with action")
        batch[ACTION] = torch.as_tensor(normalizer.normalize(ACTION, torch.as_tensor(action))).float()
        batch["action_is_pad"] = torch.as_tensor(action_is_pad, dtype=torch.bool)
        batch[f"{OBS_STATE}_is_pad"] = torch.as_tensor(obs_is_pad, dtype=torch.bool)
        batch[f"{OBS_ENV_STATE}_is_pad"] = torch.as_tensor(obs_is_pad, dtype=torch.bool).clone()
    return batch


def collate_windows(dataset, indices) -> tuple[dict, torch.Tensor, np.ndarray, np.ndarray]:
    """``(obs {key: (B, n_obs, D)}, action (B, H, A), action_is_pad, obs_is_pad)`` of the windows
    ``indices`` of a :class:`jumpflow.datasets.sequence.RobomimicSequenceDataset`."""
    items = [dataset[int(i)] for i in indices]
    obs = {k: torch.stack([it["obs"][k] for it in items]) for k in items[0]["obs"]}
    action = torch.stack([it["action"] for it in items])
    s = dataset.sampler
    a_pad, o_pad = window_pad_masks(s.indices[np.asarray(indices, dtype=np.int64)], s.horizon, s.n_obs_steps)
    return obs, action, a_pad, o_pad


# ---------------------------------------------------------------------------- LeRobot side
def _import_lerobot():
    """LeRobot's DP classes. The repository root must not be on ``sys.path`` (its ``datasets/``
    folder would hide Hugging Face's ``datasets``): such entries are dropped first."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    return DiffusionConfig, DiffusionPolicy, FeatureType, PolicyFeature


def lerobot_version() -> str:
    from importlib.metadata import version
    return version("lerobot")


def make_config(obs_shapes: dict, state_keys, env_keys, action_dim: int, horizon: int, n_obs_steps: int,
                n_action_steps: int, sampler: str = "ddpm", nfe: int = 100, down_dims=CPU_DOWN_DIMS,
                diffusion_step_embed_dim: int = 128, options: dict | None = None):
    """LeRobot ``DiffusionConfig`` for low-dim inputs; everything not named here is LeRobot's default
    (kernel 5, 8 groups, FiLM scale modulation, 100 squared-cosine DDPM steps, epsilon prediction,
    clip to [-1, 1], no loss masking of padded actions) unless ``options`` (more ``DiffusionConfig``
    fields, e.g. ``{"do_mask_loss_for_padding": True}``) sets it."""
    DiffusionConfig, _, FeatureType, PolicyFeature = _import_lerobot()
    def dim(keys):
        return sum(int(np.prod(obs_shapes[k])) for k in keys)
    return DiffusionConfig(
        n_obs_steps=n_obs_steps, horizon=horizon, n_action_steps=n_action_steps,
        input_features={OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(dim(state_keys),)),
                        OBS_ENV_STATE: PolicyFeature(type=FeatureType.ENV, shape=(dim(env_keys),))},
        output_features={ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(int(action_dim),))},
        down_dims=tuple(down_dims), diffusion_step_embed_dim=int(diffusion_step_embed_dim),
        noise_scheduler_type=sampler.upper(), num_inference_steps=int(nfe), device="cpu", **(options or {}))


def make_policy(config):
    _, DiffusionPolicy, _, _ = _import_lerobot()
    return DiffusionPolicy(config)


class LeRobotDPAdapter(torch.nn.Module):
    """jumpflow's policy interface around a LeRobot ``DiffusionPolicy``.

    ``predict_action(obs_dict) -> (B, n_action_steps, A)`` raw actions from ``obs_dict[key]``
    ``(B, n_obs_steps, D)`` raw observations: normalise, LeRobot's ``generate_actions`` (its sampler,
    ``horizon`` actions, the ``n_action_steps`` from the current step kept), unnormalise.
    ``predict_chunk`` returns the task's ``horizon`` actions (for the evaluator's async / ensemble
    modes): all of LeRobot's, or their first ``horizon`` when its UNet runs a padded window
    (:func:`lerobot_horizon`; ``None``: LeRobot's own horizon).
    """

    def __init__(self, policy, normalizer, state_keys, env_keys, n_obs_steps: int, n_action_steps: int,
                 horizon: int | None = None):
        super().__init__()
        self.policy, self.normalizer = policy, normalizer
        self.state_keys, self.env_keys = list(state_keys), list(env_keys)
        self.n_obs_steps, self.n_action_steps = int(n_obs_steps), int(n_action_steps)
        self.horizon = None if horizon is None else int(horizon)
        self.inference_steps = int(policy.diffusion.num_inference_steps)
        self.eval()

    def reset(self) -> None:
        self.policy.reset()

    def _batch(self, obs_dict: dict) -> dict:
        return to_lerobot_batch(obs_dict, None, self.normalizer, self.state_keys, self.env_keys)

    @torch.no_grad()
    def predict_action(self, obs_dict: dict) -> torch.Tensor:
        actions = self.policy.diffusion.generate_actions(self._batch(obs_dict))
        return self.normalizer.unnormalize(ACTION, actions)

    @torch.no_grad()
    def predict_chunk(self, obs_dict: dict) -> torch.Tensor:
        batch = self._batch(obs_dict)
        model = self.policy.diffusion
        cond = model._prepare_global_conditioning(batch)
        actions = model.conditional_sample(batch[OBS_STATE].shape[0], global_cond=cond)   # (B, H_lerobot, A)
        return self.normalizer.unnormalize(ACTION, actions[:, :self.horizon])


# ---------------------------------------------------------------------------- training
def compose_recipe(task: str, steps: int, overrides=()):
    """jumpflow's composed config for ``task`` (``experiment=policy_cpu``), as ``bench/policy.py``
    composes it: the task, the batch size, the optimiser, LR schedule, grad clip and EMA."""
    from hydra import compose, initialize_config_module

    recipe = "policy_cpu_image" if task.endswith("_image") else "policy_cpu"
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        return compose("train", overrides=[f"experiment={recipe}", f"task={task}", "logger=none",
                                           f"trainer.max_steps={steps}", *overrides])


def task_horizon(cfg) -> int:
    """The action window (steps) of a composed recipe's task."""
    return int(cfg.task.horizon)


def peer_signature(cfg, seed: int, optim: str, down_dims, options: dict | None, horizon: int) -> dict:
    """What a resumed peer run must share with the checkpoint it resumes (JSON)."""
    return {"dataset": str(cfg.task.dataset), "env": str(cfg.task.env), "seed": int(seed), "optim": optim,
            "down_dims": [int(d) for d in down_dims], "options": dict(options or {}), "horizon": int(horizon),
            "steps": int(cfg.trainer.max_steps), "batch_size": int(cfg.trainer.batch_size)}


def padded_horizon(horizon: int, task_horizon: int) -> int | None:
    """LeRobot's horizon when it pads the task's window (it names the rows' variant), else ``None``."""
    return None if int(horizon) == int(task_horizon) else int(horizon)


def seed_run_dir(run_dir, label: str, variant: str, seed: int) -> Path:
    """The folder of one seed's checkpoints and rollout results under ``--run-dir``."""
    return Path(run_dir) / f"{label}_{variant}_s{seed}"


def check_run_dir(ckpt_dir, signature: dict, resume: bool, warn=print):
    """``(path, tensors, meta)`` of the newest valid checkpoint in ``ckpt_dir`` to resume, or ``None``
    when there is none. Refuses (``ValueError``, one line naming the file) checkpoints without
    ``resume``, and a checkpoint whose :func:`peer_signature` differs, naming the keys that differ."""
    from jumpflow.checkpoint import latest_valid_checkpoint

    found = latest_valid_checkpoint(ckpt_dir, warn=warn) if ckpt_dir is not None else None
    if found is None:
        return None
    if not resume:
        raise ValueError(f"{ckpt_dir} holds checkpoints ({found[0].name}): pass --resume to continue them, "
                         "or another --run-dir")
    old = found[2].get("peer") or {}
    differ = [f"{k} {old.get(k)!r} there, {v!r} now" for k, v in signature.items() if old.get(k) != v]
    if differ:
        raise ValueError(f"{found[0]} was trained with other settings ({'; '.join(differ)}): use another --run-dir")
    return found


def _eval_weights(tensors: dict[str, torch.Tensor], has_ema: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's rollouts use: the EMA's averaged module, else the trained model."""
    from jumpflow.checkpoint import unprefixed

    if has_ema:
        return unprefixed(unprefixed(tensors, "ema"), "module")
    return unprefixed(tensors, "model")


def train_lerobot_dp(cfg, task, seed: int, optim: str, down_dims, ckpt_every: int, keep: int,
                     log=print, options: dict | None = None, horizon: int | None = None,
                     ckpt_dir: Path | None = None, resume: bool = False) -> dict:
    """Train LeRobot's DP on ``task``'s windows for ``cfg.trainer.max_steps`` steps of
    ``cfg.trainer.batch_size``; returns ``{"checkpoints": [(step, state_dict)], "train_seconds",
    "params", "losses", "horizon"}`` (the EMA weights with ``optim="jumpflow"``, the trained ones with
    ``lerobot``; ``"horizon"`` LeRobot's, ``"task_horizon"`` the task's).

    ``horizon``: LeRobot's action horizon when longer than the task's (the windows are padded by
    :func:`pad_action_window`; see :func:`lerobot_horizon`), default the task's. ``ckpt_dir``: every
    checkpoint is also written there (jumpflow's safetensors + JSON format, atomic, the last ``keep``
    kept: model, EMA, optimiser, LR schedule, losses, training time), and ``resume`` continues from the
    newest one, which must come from the same task, seed and settings (:func:`peer_signature`); the
    data order and each step's noise draw are functions of the step, so a resumed run takes the same
    batches and draws as an uninterrupted one. Checkpoints there without ``resume`` are refused."""
    from omegaconf import OmegaConf

    from jumpflow.checkpoint import (
        checkpoint_paths,
        collect_state,
        read_checkpoint,
        restore_state,
        save_checkpoint,
    )
    from jumpflow.trainer import GlobalBatchSampler, build_ema, build_optimizer, mix_seed, seed_everything

    tcfg, ocfg, ecfg = cfg.trainer, cfg.optim, cfg.ema
    steps, batch_size = int(tcfg.max_steps), int(tcfg.batch_size)
    horizon = int(task.horizon if horizon is None else horizon)
    signature = peer_signature(cfg, seed, optim, down_dims, options, horizon)
    found = check_run_dir(ckpt_dir, signature, resume, warn=log)
    dataset = task.train_dataset()
    normalizer = dataset.get_normalizer()
    state_keys, env_keys = split_obs_keys(task.obs_keys, getattr(task, "env_state_keys", None))
    seed_everything(seed)
    config = make_config(task.obs_shapes, state_keys, env_keys, task.action_dim, horizon, task.n_obs_steps,
                         task.n_action_steps, down_dims=down_dims, options=options)
    policy = make_policy(config)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    ema = None
    if optim == "jumpflow":
        optimizer, scheduler = build_optimizer(params, ocfg, steps)
        grad_clip = None if tcfg.grad_clip is None else float(tcfg.grad_clip)
        ema, ema_update = build_ema(policy, ecfg)
    elif optim == "lerobot":          # LeRobot's own presets for DP
        opt_cfg = config.get_optimizer_preset()
        optimizer = opt_cfg.build(policy.get_optim_params())
        scheduler = config.get_scheduler_preset().build(optimizer, num_training_steps=steps)
        grad_clip = float(opt_cfg.grad_clip_norm)
    else:
        raise ValueError(f"optim must be 'jumpflow' or 'lerobot', got {optim!r}")

    checkpoints, losses, start, before = [], [], 0, 0.0
    if found is not None:
        path, tensors, meta = found
        start, _ = restore_state(path, tensors, meta, policy, ema, optimizer, scheduler, cfg, warn=log)
        losses, before = list(meta["losses"]), float(meta["train_seconds"])
        for kept in checkpoint_paths(ckpt_dir):     # the earlier checkpoints' weights, for DP's protocol
            kept_tensors, kept_meta = (tensors, meta) if kept == path else read_checkpoint(kept)
            checkpoints.append((int(kept_meta["step"]), _eval_weights(kept_tensors, ema is not None)))
        log(f"[lerobot_dp seed {seed}] resumed from {path} at step {start} ({before:.0f} s of training)")
    sampler = iter(GlobalBatchSampler(len(dataset), batch_size, 1, [0], seed))
    for _ in range(start):                          # the batches the checkpoint's steps took
        next(sampler)
    # the recipe parts the peer uses (the backbone's and objective's interpolations need a built task)
    resolved = {"seed": cfg.get("seed"), **{k: OmegaConf.to_container(cfg[k], resolve=True)
                                            for k in ("task", "trainer", "optim", "ema")}}
    t0 = time.perf_counter()
    for step in range(start, steps):
        indices = [i for i, _ in next(sampler)]
        obs, action, a_pad, o_pad = collate_windows(dataset, indices)
        action, a_pad = pad_action_window(action, a_pad, horizon)
        batch = to_lerobot_batch(obs, action, normalizer, state_keys, env_keys, a_pad, o_pad)
        torch.manual_seed(mix_seed(seed, step, 0, 0x401E))        # the noise / timestep draw of this step
        loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(step + 1)
        losses.append(float(loss.detach()))
        done = step + 1
        if done % max(1, int(tcfg.log_every)) == 0 or done == steps:
            log(f"[lerobot_dp seed {seed}] step {done}/{steps} loss {np.mean(losses[-int(tcfg.log_every):]):.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} ({before + time.perf_counter() - t0:.0f} s)")
        if done % ckpt_every == 0 or done == steps:
            target = ema.module if ema is not None else policy
            checkpoints.append((done, copy.deepcopy(target.state_dict())))
            checkpoints = checkpoints[-keep:]
            if ckpt_dir is not None:
                tensors, meta = collect_state(policy, ema, optimizer, scheduler, resolved, {"step": done}, 1,
                                              f"lerobot_dp_s{seed}", {})
                meta.update(peer=signature, losses=losses, train_seconds=before + time.perf_counter() - t0)
                save_checkpoint(ckpt_dir, done, tensors, meta, keep=keep)
    return {"checkpoints": checkpoints, "train_seconds": before + time.perf_counter() - t0, "normalizer": normalizer,
            "params": sum(p.numel() for p in params), "losses": losses, "state_keys": state_keys,
            "env_keys": env_keys, "config": config, "options": dict(options or {}), "horizon": horizon,
            "task_horizon": int(task.horizon), "resumed_from_step": start or None}


def build_adapter(task, trained: dict, state_dict, sampler: str, nfe: int, down_dims) -> LeRobotDPAdapter:
    """A DiffusionPolicy built with noise scheduler ``sampler`` and ``nfe`` inference steps, the
    trained weights loaded (LeRobot's way of changing the sampler), behind :class:`LeRobotDPAdapter`."""
    config = make_config(task.obs_shapes, trained["state_keys"], trained["env_keys"], task.action_dim,
                         trained.get("horizon", task.horizon), task.n_obs_steps, task.n_action_steps,
                         sampler=sampler, nfe=nfe, down_dims=down_dims, options=trained.get("options"))
    policy = make_policy(config)
    policy.load_state_dict(state_dict)
    return LeRobotDPAdapter(policy, trained["normalizer"], trained["state_keys"], trained["env_keys"],
                            task.n_obs_steps, task.n_action_steps, horizon=task.horizon)


def evaluate(evaluator, task, adapter, seed: int) -> dict:
    """One rollout evaluation (success, episode length, mode metrics) through jumpflow's evaluator."""
    torch.manual_seed(seed)
    ev = evaluator.run(adapter)
    out = {"success_rate": ev["success_rate"], "mean_episode_length": ev["mean_episode_length"],
           "env_errors": ev["n_env_errors"], "rollout_latency_ms_p50": ev["latency_ms_p50"],
           "eval_seconds": ev["seconds"]}
    out.update(task.mode_summary(ev))
    return out


def measure_latency(adapter, dataset, calls: int = 20, warmup: int = 2) -> dict:
    """``predict_action`` wall time per chunk at batch 1 (one env, as jumpflow's rows measure it in
    their rollouts), on observation histories of ``calls`` windows spread over the dataset."""
    picks = np.linspace(0, len(dataset) - 1, calls + warmup).astype(int)
    times = []
    for j, i in enumerate(picks):
        obs = {k: v[None] for k, v in dataset[int(i)]["obs"].items()}
        t0 = time.perf_counter()
        np.asarray(adapter.predict_action(obs))
        if j >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"latency_ms_p50": float(np.percentile(times, 50)), "latency_ms_p95": float(np.percentile(times, 95)),
            "latency_calls": len(times)}


# ---------------------------------------------------------------------------- tables
def jumpflow_rows(task: str, path: Path | None = None) -> list[dict]:
    """jumpflow's own rows of ``task`` in ``bench/results/policy.json`` (not the peer's)."""
    return [r for r in load_rows(path or RESULTS / "policy.json")
            if r.get("task") == task and r.get("objective") != OBJECTIVE]


def peer_rows(task: str, path: Path | None = None) -> list[dict]:
    """The peer's rows (``objective: lerobot_dp``) of ``task``."""
    return [r for r in load_rows(path or RESULTS / "policy.json")
            if r.get("task") == task and r.get("objective") == OBJECTIVE]


def peer_variant(optim: str, down_dims, options: dict | None = None, padded_horizon: int | None = None) -> str:
    """The ``variant`` of a peer row: its UNet stages, when not jumpflow's its optimiser recipe, the
    horizon LeRobot's UNet runs when the window is padded to it (``_pad8``), and the
    ``DiffusionConfig`` options set beyond the defaults (``_do_mask_loss_for_padding=True``)."""
    name = "unet" + "-".join(str(int(d)) for d in down_dims)
    name = name if optim == "jumpflow" else f"{name}_{optim}_optim"
    name = name if padded_horizon is None else f"{name}_pad{int(padded_horizon)}"
    return name + "".join(f"_{k}={v}" for k, v in sorted((options or {}).items()))


def parse_options(items: list[str]) -> dict:
    """``["do_mask_loss_for_padding=true"]`` -> ``{"do_mask_loss_for_padding": True}`` (YAML values);
    an item without ``=`` is refused by name."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--lerobot-option: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r.get(key) for r in rows]
    return sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None


def side_by_side(rows: list[dict], jf_rows: list[dict]) -> list[dict]:
    """One line per (source, objective, variant, sampler, NFE): success (last checkpoint, and DP's max /
    last-5 mean) averaged over the training seeds that ran, latency p50, and the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for source, rs in (("lerobot", rows), ("jumpflow", jf_rows)):
        for r in rs:
            groups.setdefault((source, r["task"], r["objective"], r.get("variant", ""), r["sampler"], r["nfe"]),
                              []).append(r)
    out = []
    for (source, task, objective, variant, sampler, nfe), rs in groups.items():
        mean = partial(_mean_of, rs)
        out.append({"source": source, "task": task, "objective": objective, "variant": variant,
                    "sampler": sampler, "nfe": nfe,
                    "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                    "success": mean("success_rate"), "success_max": mean("success_max"),
                    "success_last_mean": mean("success_last_mean"), "latency_ms_p50": mean("latency_ms_p50"),
                    "mode_tv": mean("mode_tv"), "train_seconds": mean("train_seconds")})
    return out


# ---------------------------------------------------------------------------- main
def make_row(task_name: str, seed: int, sampler: str, nfe: int, evals: list[dict], lat: dict, trained: dict,
             cfg, args, down_dims) -> dict:
    """A row in ``bench/results/policy.json``'s fields (DP protocol: the last checkpoint's success,
    the max and mean over the checkpoints, mode metrics averaged over them)."""
    last = evals[-1]
    successes = [e["success_rate"] for e in evals]
    padded = None if "horizon" not in trained else padded_horizon(trained["horizon"],
                                                                   trained.get("task_horizon", trained["horizon"]))
    row = {"task": task_name, "objective": OBJECTIVE,
           "variant": peer_variant(args.optim, down_dims, trained.get("options"), padded),
           "sampler": sampler, "nfe": nfe, "seed": seed, **last, **lat,
           "latency_batch": 1, "eval_envs": args.eval_envs, "train_seconds": trained["train_seconds"],
           "train_steps": int(cfg.trainer.max_steps), "batch_size": int(cfg.trainer.batch_size),
           "episodes": args.episodes, "threads": torch.get_num_threads(), "protocol": args.protocol,
           "success_max": max(successes), "success_last_mean": sum(successes) / len(successes),
           # wall time of every checkpoint's rollouts at this sampler (the row's own is the last one's)
           "eval_seconds": sum(e["eval_seconds"] for e in evals),
           "checkpoint_successes": successes, "checkpoint_steps": [s for s, _ in trained["checkpoints"]],
           "params": trained["params"], "down_dims": list(down_dims), "lerobot_horizon": trained.get("horizon"),
           "backbone": f"lerobot DiffusionConditionalUnet1d down_dims={list(down_dims)} (CPU size)",
           "optim": args.optim, "lerobot_options": trained.get("options", {}),
           "final_loss": float(np.mean(trained["losses"][-50:])), "resumed_from_step": trained.get("resumed_from_step"),
           "lerobot": lerobot_version(), "torch": torch.__version__,
           "state_keys": trained["state_keys"], "env_state_keys": trained["env_keys"]}
    for k in ("mode_entropy_ratio", "mode_tv", "mode_switches"):
        if k in last and all(e.get(k) is not None for e in evals):
            row[k] = sum(e[k] for e in evals) / len(evals)           # mean over the checkpoints
    return row


def _write_rows(rows: list[dict], out: Path, args) -> None:
    """Write ``rows`` to ``out`` keeping the file's own ``config`` (``policy.json`` is
    ``bench.policy``'s file too) with the peer's settings under ``config["peer_lerobot"]``."""
    peer = {"episodes": args.episodes, "steps": args.steps, "protocol": args.protocol, "overrides": args.override,
            "note": "LeRobot DiffusionPolicy on jumpflow's windows, budget, test seeds and rollout evaluator; "
                    "rows objective=lerobot_dp"}
    write_results("policy", config_keeping(out, {"peer_lerobot": peer}), rows, path=out)


def run_seed(task_name: str, seed: int, args, variants, down_dims, out: Path, options: dict | None = None,
             label: str | None = None, horizon: int | None = None) -> None:
    """Train one seed, evaluate its checkpoints at every variant, write the rows (task ``label``,
    default ``task_name``) as they finish. ``horizon``: LeRobot's padded action horizon
    (:func:`lerobot_horizon`), default the task's. With ``args.run_dir`` the run keeps its
    checkpoints and each checkpoint's rollout results in ``<run_dir>/<label>_<variant>_s<seed>``, so
    ``args.resume`` picks up an interrupted run where it stopped, in training or in evaluation."""
    from hydra.utils import instantiate

    from jumpflow.io import atomic_write_text

    label = label or task_name

    cfg = compose_recipe(task_name, args.steps, args.override)
    horizon = task_horizon(cfg) if horizon is None else int(horizon)
    variant = peer_variant(args.optim, down_dims, options, padded_horizon(horizon, task_horizon(cfg)))
    run = seed_run_dir(args.run_dir, label, variant, seed) if getattr(args, "run_dir", None) else None
    evals_path = run / "evals.json" if run is not None else None
    cached = {}
    if evals_path is not None and evals_path.is_file():
        try:
            cached = json.loads(evals_path.read_text())
        except ValueError as err:
            raise ValueError(f"rollout results {evals_path} are unreadable ({err}): delete the file to "
                             "roll the checkpoints out again") from None
    task = instantiate(cfg.task)
    if args.env_state_keys:
        task.env_state_keys = args.env_state_keys.split(",")
    task.prepare()
    total = int(cfg.trainer.max_steps)
    ckpt_every = max(1, total // (2 * DP_CHECKPOINTS)) if args.protocol == "dp" else total
    keep = DP_CHECKPOINTS if args.protocol == "dp" else 1
    print(f"== {label} seed {seed}: LeRobot {lerobot_version()} DiffusionPolicy, down_dims {down_dims}, "
          f"{total} steps x batch {int(cfg.trainer.batch_size)}, optim {args.optim}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    trained = train_lerobot_dp(cfg, task, seed, args.optim, down_dims, ckpt_every, keep, log=partial(print, flush=True),
                               options=options, horizon=horizon, ckpt_dir=None if run is None else run / "checkpoints",
                               resume=bool(getattr(args, "resume", False)))
    # episodes run eval_envs at a time (spawned envs, one batched chunk request for all): the test seeds
    # are the rows' (episode i resets with seed 1_000_000 + i); latency is measured apart, at batch 1
    task.eval_envs = args.eval_envs
    # DP's protocol rolls out to DP's episode limit for the task and demo style, as bench.policy does
    limit = rollout_limit(args.protocol, task_name, args.style, task.eval_max_steps)
    evaluator = task.evaluator(None, n_episodes=args.episodes, n_videos=0, max_steps=limit)
    try:
        for sampler, nfe in variants:
            evals = []
            for step, state_dict in trained["checkpoints"]:
                t0 = time.perf_counter()
                adapter = build_adapter(task, trained, state_dict, sampler, nfe, down_dims)
                key = f"{sampler}:{nfe}:step{step}:episodes{args.episodes}:limit{limit}"
                was_cached = key in cached          # rolled out before the run was interrupted
                if was_cached:
                    evals.append(cached[key])
                else:
                    evals.append(evaluate(evaluator, task, adapter, seed))
                    if evals_path is not None:
                        cached[key] = evals[-1]
                        atomic_write_text(evals_path, json.dumps(cached, indent=1, allow_nan=True))
                print(f"   {sampler}-{nfe} step {step}: success {evals[-1]['success_rate']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s{', cached' if was_cached else ''})", flush=True)
            lat = measure_latency(adapter, task.train_dataset(), args.latency_calls)
            print(f"   {sampler}-{nfe}: latency p50 {lat['latency_ms_p50']:.1f} ms, p95 {lat['latency_ms_p95']:.1f} ms "
                  "per chunk (batch 1)", flush=True)
            row = {**make_row(label, seed, sampler, nfe, evals, lat, trained, cfg, args, down_dims),
                   "eval_max_steps": limit}
            # re-read: another process may have added rows since this one started
            rows = [r for r in load_rows(out) if row_key(r) != row_key(row)] + [row]
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("mode_freq")}), flush=True)
            _write_rows(rows, out, args)
    finally:
        evaluator.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="reach_around_lowdim")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=1000, help="training steps (jumpflow's rows: 1000)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--eval-envs", type=int, default=10, help="episodes rolled out together (spawned envs)")
    ap.add_argument("--latency-calls", type=int, default=20, help="batch-1 predict_action calls timed")
    ap.add_argument("--optim", choices=("jumpflow", "lerobot"), default="jumpflow",
                    help="jumpflow: the recipe's AdamW / warm-up + cosine / clip / EMA (jumpflow's rows); "
                         "lerobot: DiffusionConfig's presets (Adam 1e-4, 500 warm-up, clip 10, no EMA)")
    ap.add_argument("--down-dims", default=",".join(map(str, CPU_DOWN_DIMS)),
                    help="UNet stages (LeRobot's default 512,1024,2048; CPU: 64,128,256)")
    ap.add_argument("--variants", default=",".join(f"{s}:{n}" for s, n in VARIANTS), help="sampler:nfe,...")
    ap.add_argument("--protocol", choices=("last", "dp"), default="dp")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (jumpflow's rows: 1)")
    ap.add_argument("--data", default=None, help="dataset folder (default: $JUMPFLOW_DATA, else <repo>/data)")
    ap.add_argument("--env-state-keys", default=None, help="obs keys for observation.environment_state")
    ap.add_argument("--override", action="append", default=[], help="extra hydra override of the recipe")
    ap.add_argument("--style", choices=("ph", "mh"), default="ph",
                    help="demo style: mh trains on human-like demos (task.demo_style=mh), rows labelled <task>_mh")
    ap.add_argument("--run-dir", default=None,
                    help="keep each seed's checkpoints (safetensors + JSON) and rollout results in a folder "
                         "<run-dir>/<task>_<variant>_s<seed>, so that --resume continues an interrupted run")
    ap.add_argument("--resume", action="store_true", help="continue the runs under --run-dir")
    ap.add_argument("--pad-horizon", action="store_true",
                    help="pad a task's action window to a multiple of LeRobot's UNet downsampling (2 ** "
                         "len(down_dims)) by repeating its last action, as an episode's end is padded")
    ap.add_argument("--lerobot-option", action="append", default=[],
                    help="KEY=VALUE: a DiffusionConfig field beyond the defaults (e.g. do_mask_loss_for_padding=true); "
                         "named in the rows' variant")
    ap.add_argument("--out", default=str(RESULTS / "policy.json"), help="result file (rows merged by key)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="print the side-by-side table and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    if args.data:
        os.environ["JUMPFLOW_DATA"] = args.data
    os.environ.setdefault("JUMPFLOW_DATA", str(ROOT / "data"))
    tasks = args.tasks.split(",")
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    down_dims = tuple(int(d) for d in args.down_dims.split(","))
    try:
        options = parse_options(args.lerobot_option)
    except ValueError as err:
        ap.error(str(err))
    conflict = dp_protocol_conflict(args.protocol, args.override)
    if conflict:
        ap.error(conflict)
    if args.resume and not args.run_dir:
        ap.error("--resume continues the runs of a --run-dir: name it")
    if not args.table_only:
        plans = []
        for task_name in tasks:      # every task's keys and horizon checked before the first one trains
            label, style_overrides = demo_style_recipe(task_name, args.style)
            run_args = argparse.Namespace(**{**vars(args), "override": [*args.override, *style_overrides]})
            cfg = compose_recipe(task_name, args.steps, run_args.override)
            own = task_horizon(cfg)
            try:
                split_obs_keys(cfg.task.obs_keys, args.env_state_keys.split(",") if args.env_state_keys else None)
                horizon = lerobot_horizon(own, down_dims, args.pad_horizon)
            except ValueError as err:
                ap.error(f"{task_name}: {err}")
            variant = peer_variant(args.optim, down_dims, options, padded_horizon(horizon, own))
            for seed in map(int, args.seeds.split(",")) if args.run_dir else ():
                ckpt_dir = seed_run_dir(args.run_dir, label, variant, seed) / "checkpoints"
                try:        # a run folder that cannot be resumed is refused now, not after the first seeds
                    check_run_dir(ckpt_dir, peer_signature(cfg, seed, args.optim, down_dims, options, horizon),
                                  args.resume)
                except ValueError as err:
                    ap.error(str(err))
            plans.append((task_name, label, run_args, horizon, variant))
        _import_lerobot()                                         # fail here, before any work
        for task_name, label, run_args, horizon, variant in plans:
            for seed in map(int, args.seeds.split(",")):
                done = {row_key(r) for r in load_rows(out)}
                if args.overwrite or not all((label, OBJECTIVE, variant, s, n, seed) in done
                                             for s, n in variants):
                    run_seed(task_name, seed, run_args, variants, down_dims, out, options, label=label,
                             horizon=horizon)
    for task_name in tasks:
        label = demo_style_recipe(task_name, args.style)[0]
        print(f"\n== {label}: LeRobot DP beside jumpflow's rows ({out}), mean over seeds")
        print_table(side_by_side(peer_rows(label, out), jumpflow_rows(label, out)))


if __name__ == "__main__":
    main()
