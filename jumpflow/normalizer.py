"""The project's one normalizer: a per-key affine map ``y = x * scale + offset``.

Modes (chosen per key when fitting):
- ``"limits"``: per-dimension min/max -> [-1, 1] (actions; low-dim observations by default, as
  Diffusion Policy does). Dimensions whose range is below ``range_eps`` map to 0.
- ``"gaussian"``: per-dimension mean/std -> zero mean, unit variance.
- ``"image"``: uint8 [0, 255] -> float [0, 1] (scalar scale 1/255).
- ``"identity"``.

All parameters and statistics (``min``, ``max``, ``mean``, ``std``) are tensors registered as
buffers, so the normalizer is saved with a model's ``state_dict`` (safetensors-friendly: flat
names ``<prefix>params.<key>.scale`` etc.) and a fresh ``Normalizer()`` loads any saved one
(keys are created from the state dict). ``unnormalize(key, normalize(key, x))`` equals ``x``
up to float rounding (float64 inputs: ~1e-15 relative).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError

MODES = ("limits", "gaussian", "image", "identity")
_FIELDS = ("scale", "offset", "min", "max", "mean", "std")


class _KeyParams(nn.Module):
    def __init__(self, **tensors: Tensor):
        super().__init__()
        for f in _FIELDS:
            self.register_buffer(f, tensors[f].clone())


class Normalizer(nn.Module):
    """Per-key affine normalization; see the module docstring.

    Build with :meth:`fit` (from data) or :meth:`set_params`; ``normalize(key, x)`` /
    ``unnormalize(key, x)`` accept torch tensors or numpy arrays of shape ``(..., *feature_shape)``
    and return the same kind (float).
    """

    def __init__(self):
        super().__init__()
        self.params = nn.ModuleDict()

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def _stats(x: np.ndarray | Tensor) -> dict:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()
        x = x.reshape(-1, *x.shape[-1:]) if x.ndim >= 1 else x.reshape(-1, 1)
        return {"min": x.amin(0), "max": x.amax(0), "mean": x.mean(0),
                "std": x.std(0, unbiased=False) if x.shape[0] > 1 else torch.zeros(x.shape[1:], dtype=x.dtype)}

    def fit_key(self, key: str, data, mode: str = "limits", range_eps: float = 1e-4,
                std_eps: float = 1e-6) -> Normalizer:
        """Fit ``key`` from ``data`` of shape ``(N, D)`` (any leading dims are flattened; images:
        any shape, only the mode matters)."""
        if mode not in MODES:
            raise ValueError(f"normalizer mode for {key!r} must be one of {MODES}, got {mode!r}")
        if mode in ("image", "identity"):
            one = torch.ones((), dtype=torch.float64)
            z = torch.zeros((), dtype=torch.float64)
            scale = one / 255.0 if mode == "image" else one
            stats = {"min": z, "max": one * (255.0 if mode == "image" else 1.0), "mean": z, "std": one}
            return self.set_params(key, scale, z, **stats)
        st = self._stats(data)
        if not (torch.isfinite(st["min"]).all() and torch.isfinite(st["max"]).all()):
            raise ConfigError("normalizer", f"data for {key!r} contains NaN or inf")
        if mode == "limits":
            rng = st["max"] - st["min"]
            const = rng < range_eps
            scale = torch.where(const, torch.ones_like(rng), 2.0 / torch.where(const, torch.ones_like(rng), rng))
            center = (st["max"] + st["min"]) / 2.0
            offset = -center * scale
        else:
            std = torch.clamp(st["std"], min=std_eps)
            scale = 1.0 / std
            offset = -st["mean"] * scale
        return self.set_params(key, scale, offset, **st)

    @classmethod
    def fit(cls, data: dict, modes: dict | None = None, default_mode: str = "limits") -> Normalizer:
        """Fit every key of ``data`` (``{key: (N, D) array}``). ``modes``: ``{key: mode}`` overrides;
        keys that end in ``_image`` default to ``"image"``."""
        norm = cls()
        modes = modes or {}
        for k, v in data.items():
            mode = modes.get(k, "image" if k.endswith("_image") else default_mode)
            norm.fit_key(k, v, mode)
        return norm

    def set_params(self, key: str, scale, offset, **stats) -> Normalizer:
        """Set ``key``'s affine map directly (float64 storage); ``stats``: optional min/max/mean/std."""
        scale = torch.as_tensor(scale, dtype=torch.float64)
        offset = torch.as_tensor(offset, dtype=torch.float64)
        if (scale == 0).any():
            raise ValueError(f"normalizer scale for {key!r} has zeros")
        full = {"scale": scale, "offset": offset}
        for f in ("min", "max", "mean", "std"):
            full[f] = torch.as_tensor(stats.get(f, torch.zeros_like(scale)), dtype=torch.float64)
        if "." in key:
            raise ValueError(f"normalizer key {key!r} must not contain '.'")
        self.params[key] = _KeyParams(**full)
        return self

    # ------------------------------------------------------------------ use
    def keys(self) -> list[str]:
        return list(self.params.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def _get(self, key: str) -> _KeyParams:
        if key not in self.params:
            raise KeyError(f"normalizer has no key {key!r}; it has {self.keys()}")
        return self.params[key]

    @staticmethod
    def _prep(x):
        is_np = isinstance(x, np.ndarray)
        t = torch.from_numpy(np.ascontiguousarray(x)) if is_np else torch.as_tensor(x)
        if not torch.is_floating_point(t):
            t = t.float()
        return t, is_np

    def normalize(self, key: str, x):
        """``x * scale + offset`` for ``key``; ``x``: ``(..., D)`` (images any shape, uint8 allowed)."""
        p = self._get(key)
        t, is_np = self._prep(x)
        y = t * p.scale.to(t) + p.offset.to(t)
        return y.numpy() if is_np else y

    def unnormalize(self, key: str, x):
        """Inverse of :meth:`normalize`: ``(x - offset) / scale``."""
        p = self._get(key)
        t, is_np = self._prep(x)
        y = (t - p.offset.to(t)) / p.scale.to(t)
        return y.numpy() if is_np else y

    def stats(self, key: str) -> dict:
        p = self._get(key)
        return {f: getattr(p, f).clone() for f in _FIELDS}

    def forward(self, batch: dict) -> dict:
        """Normalize every key of ``batch`` the normalizer knows (others pass through)."""
        return {k: (self.normalize(k, v) if k in self.params else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # create the keys a saved normalizer had, so that Normalizer() loads any state dict
        head = prefix + "params."
        found: dict[str, dict] = {}
        for name, val in state_dict.items():
            if name.startswith(head):
                rest = name[len(head):]
                if "." in rest:
                    key, field = rest.rsplit(".", 1)
                    if field in _FIELDS:
                        found.setdefault(key, {})[field] = val
        for key, fields in found.items():
            if set(fields) == set(_FIELDS) and (
                    key not in self.params
                    or any(getattr(self.params[key], f).shape != fields[f].shape for f in _FIELDS)):
                self.params[key] = _KeyParams(**{f: torch.zeros_like(fields[f]) for f in _FIELDS})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(self.params[k].scale.shape)}" for k in self.keys())
