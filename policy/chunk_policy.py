"""Action-chunk policies driven by any jumpflow objective (Diffusion Policy's interface:
``predict_action(obs_dict)``, ``compute_loss(batch)``; Chi et al., RSS 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jumpflow.generator import Generator
from jumpflow.normalizer import Normalizer
from jumpflow.objectives.base import LossOutput


class ChunkPolicy(nn.Module):
    """Observation history -> chunk of ``horizon`` actions, by one generator.

    The generator's sample is the normalised chunk ``(B, horizon, action_dim)`` in [-1, 1];
    its condition is ``encoder(normalised obs)``. The chunk covers the ``n_obs_steps - 1``
    past steps and the future; the policy executes
    ``chunk[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]`` (Diffusion Policy).

    Args:
        encoder: ``ObsEncoder`` (its ``out_dim`` is the backbone's ``cond_dim``).
        backbone: any ``(x, t, h, cond)`` backbone built for shape ``(horizon, action_dim)``.
        objective: any jumpflow objective (Drifting: ``group_by="sample"``, several generated
            chunks per observation, the expert chunk as the positive).
        normalizer: fitted on the dataset (``action`` and the obs keys).
        inference_steps: NFE of ``predict_action`` (None: the objective's default).
        temporal_ensemble: weight of the previous chunk's prediction for the steps both
            chunks cover (``None``: off). Smooths chunk boundaries.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, objective, normalizer: Normalizer, horizon: int,
                 n_obs_steps: int, n_action_steps: int, action_dim: int, inference_steps: int | None = 1,
                 temporal_ensemble: float | None = None):
        super().__init__()
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(f"horizon: {horizon} is shorter than n_obs_steps - 1 + n_action_steps "
                             f"= {n_obs_steps - 1 + n_action_steps}")
        if temporal_ensemble is not None and not 0 < temporal_ensemble <= 1:
            raise ValueError(f"temporal_ensemble: must be in (0, 1] or null, got {temporal_ensemble}")
        self.generator = Generator(backbone, objective, encoder, shape=(horizon, action_dim))
        self.normalizer = normalizer
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim = action_dim
        self.inference_steps = inference_steps
        self.temporal_ensemble = temporal_ensemble
        self._tail: Tensor | None = None

    @property
    def objective(self):
        return self.generator.objective

    @property
    def backbone(self) -> nn.Module:
        return self.generator.backbone

    @property
    def aux(self) -> nn.ModuleDict:
        """The objective's modules (TVM's EMA target, DTM's head): ``on_step_end`` reaches them here."""
        return self.generator.aux

    @property
    def encoder(self) -> nn.Module:
        return self.generator.cond_encoder

    def normalize_obs(self, obs: dict) -> dict:
        keys = [*self.encoder.lowdim_keys, *self.encoder.image_keys]
        missing = [k for k in keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; it has {sorted(obs)}")
        return {k: self.normalizer.normalize(k, obs[k].float()) for k in keys}

    def compute_loss(self, batch: dict) -> LossOutput:
        """``batch["obs"][key]: (B, n_obs_steps, ...)``, ``batch["action"]: (B, horizon, A)`` (raw)."""
        action = batch["action"]
        if action.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"batch['action'] has shape {tuple(action.shape)}, expected (B, {self.horizon}, "
                             f"{self.action_dim})")
        x = self.normalizer.normalize("action", action)                           # (B, H, A) in [-1, 1]
        if not torch.isfinite(x).all():
            raise ValueError("batch['action'] contains NaN or inf")
        cond = self.generator.encode(self.normalize_obs(batch["obs"]))            # (B, C)
        return self.objective.loss(self.generator, x, cond)

    def reset(self) -> None:
        """Forget the previous chunk (call at episode start)."""
        self._tail = None

    def set_inference(self, steps: int | None, sampler: str | None = None) -> None:
        """NFE (and, for DDPM, ``"ddpm"`` / ``"ddim"``) used by :meth:`predict_action`."""
        self.inference_steps = steps
        if sampler is not None:
            if not hasattr(self.objective, "sampler"):
                raise ValueError(f"sampler: objective {self.objective.name} has no sampler choice")
            self.objective.sampler = sampler

    @torch.no_grad()
    def predict_chunk(self, obs: dict, generator: torch.Generator | None = None) -> Tensor:
        """The whole unnormalised chunk ``(B, horizon, action_dim)``."""
        p = next(self.parameters())
        obs = {k: v.to(p.device) for k, v in obs.items()}
        cond = self.generator.encode(self.normalize_obs(obs))                     # (B, C)
        noise = torch.randn((cond.shape[0], self.horizon, self.action_dim), generator=generator, device=p.device,
                            dtype=p.dtype)
        steps = self.inference_steps if self.inference_steps is not None else self.objective.default_steps
        x = self.objective.sample(self.generator, noise, cond, steps)             # (B, H, A)
        return self.normalizer.unnormalize("action", x.clamp(-1.5, 1.5))

    @torch.no_grad()
    def predict_action(self, obs_dict: dict) -> Tensor:
        """``obs_dict[key]: (B, n_obs_steps, ...)`` raw observations -> ``(B, n_action_steps, action_dim)``."""
        chunk = self.predict_chunk(obs_dict)                                      # (B, H, A)
        start = self.n_obs_steps - 1
        action = chunk[:, start:start + self.n_action_steps].clone()              # (B, n_act, A)
        if self.temporal_ensemble is not None:
            if self._tail is not None and self._tail.shape[0] == action.shape[0]:
                n = min(self._tail.shape[1], action.shape[1])
                w = self.temporal_ensemble
                action[:, :n] = (action[:, :n] + w * self._tail[:, :n]) / (1 + w)
            self._tail = chunk[:, start + self.n_action_steps:]                   # (B, H - start - n_act, A)
        return action
