"""Action-chunk policies driven by any jumpflow objective (Diffusion Policy's interface:
``predict_action(obs_dict)``, ``compute_loss(batch)``; Chi et al., RSS 2023)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError
from jumpflow.generator import Generator
from jumpflow.normalizer import Normalizer
from jumpflow.objectives.base import Inference


class ChunkPolicy(Generator):
    """Observation history -> chunk of ``horizon`` actions: a :class:`Generator` whose data is
    the action chunk and whose condition is the observation dict.

    The loss and sampling paths are the Generator's: actions are normalised to [-1, 1] in its
    data path, observations in its condition path (``normalizer``), the objective receives
    the policy itself as ``net``. The chunk covers the ``n_obs_steps - 1`` past steps and the
    future; the policy executes ``chunk[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``
    (Diffusion Policy).

    Args:
        encoder: ``ObsEncoder`` (its ``out_dim`` is the backbone's ``cond_dim``).
        backbone: any ``(x, t, h, cond)`` backbone built for shape ``(horizon, action_dim)``.
        objective: any jumpflow objective (Drifting: ``group_by="sample"``, several generated
            chunks per observation, the expert chunk as the positive).
        normalizer: fitted on the dataset (``action`` and the obs keys).
        inference: sampling settings of ``predict_action`` (an ``Inference``, an NFE or a dict;
            ``None`` fields: the objective's defaults).
        temporal_ensemble: weight of the previous chunk's prediction for the steps both
            chunks cover (``None``: off). Smooths chunk boundaries.
        prefix_max: real-time chunking by prefix conditioning (Black, Galliker & Levine 2025,
            "Real-Time Execution of Action Chunking Flow Policies", in its training-time form): the
            first ``d`` executed actions of the chunk (normalised, zero-padded to ``prefix_max``)
            and their mask are appended to the condition, ``d ~ U{0..prefix_max}`` per training
            sample; at inference the committed actions that run while the next chunk is computed
            are that prefix, and the new chunk continues them. Works for every objective (it lives
            in the condition path). ``0``: off, exactly the plain policy. The backbone's
            ``cond_dim`` is ``encoder.out_dim + prefix_max * (action_dim + 1)``.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, objective, normalizer: Normalizer, horizon: int,
                 n_obs_steps: int, n_action_steps: int, action_dim: int,
                 inference: Inference | int | dict | None = None, temporal_ensemble: float | None = None,
                 prefix_max: int = 0):
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ConfigError("horizon", f"{horizon} is shorter than n_obs_steps - 1 + n_action_steps "
                             f"= {n_obs_steps - 1 + n_action_steps}")
        if temporal_ensemble is not None and not 0 < temporal_ensemble <= 1:
            raise ConfigError("temporal_ensemble", f"must be in (0, 1] or null, got {temporal_ensemble}")
        super().__init__(backbone, objective, encoder, shape=(horizon, action_dim), normalizer=normalizer,
                         data_key="action", cond_key="obs", clip_sample=1.5)
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim = action_dim
        self.inference = objective.resolve(inference)
        self.temporal_ensemble = temporal_ensemble
        if not 0 <= prefix_max <= n_action_steps:
            raise ValueError(f"prefix_max: must be in [0, n_action_steps={n_action_steps}], got {prefix_max}")
        self.prefix_max = int(prefix_max)
        self._tail: Tensor | None = None

    @staticmethod
    def prefix_cond_dim(prefix_max: int, action_dim: int) -> int:
        """Extra condition width of prefix conditioning."""
        return prefix_max * (action_dim + 1)

    @property
    def supports_prefix(self) -> bool:
        return self.prefix_max > 0

    def prefix_condition(self, prefix: Tensor, lengths: Tensor) -> Tensor:
        """``prefix: (B, >= prefix_max or fewer, A)`` normalised actions, ``lengths: (B,)`` ints ->
        ``(B, prefix_max * (A + 1))``: the first ``lengths[b]`` rows (zeros after) and their mask."""
        b = prefix.shape[0]
        rows = torch.zeros(b, self.prefix_max, self.action_dim, device=prefix.device, dtype=prefix.dtype)
        n = min(prefix.shape[1], self.prefix_max)
        rows[:, :n] = prefix[:, :n]
        mask = (torch.arange(self.prefix_max, device=prefix.device)[None] < lengths[:, None]).to(prefix.dtype)
        return torch.cat([(rows * mask[..., None]).flatten(1), mask], dim=1)       # (B, P*A + P)

    def prepare_batch(self, batch: dict):
        """As the Generator's; with prefix conditioning, a delay ``d ~ U{0..prefix_max}`` per sample
        and the chunk's first ``d`` executed actions appended to the condition."""
        x, cond = super().prepare_batch(batch)                                    # (B, H, A), (B, C)
        if not self.prefix_max:
            return x, cond
        start = self.n_obs_steps - 1
        lengths = torch.randint(0, self.prefix_max + 1, (x.shape[0],), device=x.device)
        extra = self.prefix_condition(x[:, start:start + self.prefix_max], lengths)
        return x, torch.cat([cond, extra], dim=1)

    @property
    def encoder(self) -> nn.Module:
        return self.cond_encoder

    @property
    def inference_steps(self) -> int:
        return self.inference.steps

    def reset(self) -> None:
        """Forget the previous chunk (call at episode start)."""
        self._tail = None

    def set_inference(self, inference: Inference | int | dict | None) -> None:
        """Sampling settings used by :meth:`predict_action` (the objective is not touched)."""
        self.inference = self.objective.resolve(inference)

    @torch.no_grad()
    def predict_chunk(self, obs: dict, generator: torch.Generator | None = None, prefix: Tensor | None = None,
                      prefix_len: int | None = None) -> Tensor:
        """The whole unnormalised chunk ``(B, horizon, action_dim)``.

        ``prefix: (B, m, A)`` raw actions already committed for the first ``m`` executed steps
        (``m = prefix_len``, at most ``prefix_max``): the chunk is generated given them and its
        rows ``n_obs_steps - 1 .. + m`` are exactly them."""
        p = next(self.parameters())
        obs = {k: v.to(p.device) for k, v in obs.items()}
        if not self.prefix_max:
            if prefix is not None and (prefix_len or prefix.shape[1]) > 0:
                raise ValueError("prefix: this policy was trained without prefix conditioning (prefix_max = 0)")
            return self.generate(obs, generator=generator, inference=self.inference)   # (B, H, A)
        cond = self.encode(obs)                                                   # (B, C)
        b = cond.shape[0]
        m = 0 if prefix is None else min(int(prefix.shape[1] if prefix_len is None else prefix_len), self.prefix_max)
        if m:
            pre = self.normalize_data_rows(prefix[:, :m].to(p.device, p.dtype))   # (B, m, A)
        else:
            pre = torch.zeros(b, 0, self.action_dim, device=p.device, dtype=p.dtype)
        cond = torch.cat([cond, self.prefix_condition(pre, torch.full((b,), m, device=p.device))], dim=1)
        noise = torch.randn((b, self.horizon, self.action_dim), generator=generator, device=p.device, dtype=p.dtype)
        x = self.sample_normalized(cond, noise, self.inference)                   # (B, H, A)
        chunk = self.unnormalize_data(x)
        if m:
            start = self.n_obs_steps - 1
            chunk[:, start:start + m] = prefix[:, :m].to(chunk)                  # the committed actions, exactly
        return chunk

    def normalize_data_rows(self, actions: Tensor) -> Tensor:
        """Raw actions ``(B, m, A)`` -> normalised (the data path's normaliser, any number of rows)."""
        if self.normalizer is None or self.data_key not in self.normalizer:
            return actions
        return self.normalizer.normalize(self.data_key, actions)

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
