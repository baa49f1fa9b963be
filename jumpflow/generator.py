"""A generator = condition encoder + backbone + objective (+ normalizer).

The objective never owns the network: the generator passes *itself* as ``net`` to
``objective.loss(net, x, cond)`` / ``objective.sample(net, noise, cond, inference)``, so it is the
one object that knows how to encode a condition, where the null condition for guidance
lives and which modules the objective asked for (``aux``: DTM's head, TVM's EMA target,
Drifting's frozen feature map)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import DataPrediction, Inference, LossOutput, Objective


class ClassEmbedding(nn.Module):
    """Class labels ``(B,)`` int64 -> ``(B, dim)``; row ``num_classes`` is the null class
    used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.dim = num_classes, dim
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be integers, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}], got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self.table(labels.long())                                  # (B, dim)

    def null(self, cond: Tensor) -> Tensor:
        return self.table.weight[self.num_classes].expand_as(cond)        # (B, dim)


class GuidanceEmbedding(nn.Module):
    """A guidance scale ``w: (B,)`` -> ``(B, dim)`` added to the condition: the one piece for
    methods that train with a sampled scale and take it as an input (Drifting's ``alpha``, TVM's
    ``beta = 1 / w``, improved MeanFlow's ``omega``; seed ``002``: ``x = f(eps, c, gamma)``).

    Sinusoidal features of ``log w`` (scales are multiplicative), a 2-layer MLP, and an output
    layer initialised at zero, so a generator is exactly its unguided self until it learns."""

    def __init__(self, dim: int, freqs: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), freqs)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, scale: Tensor) -> Tensor:
        arg = scale.float().clamp_min(1e-3).log()[:, None] * self.freqs[None]          # (B, F)
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))                       # (B, dim)


def _rng_state(raw_cond):
    """``(cpu state, (cuda device, its state) or None)`` of the generators that an encoder of
    ``raw_cond`` (a tensor or a dict of tensors) draws from."""
    first = next(iter(raw_cond.values())) if isinstance(raw_cond, dict) else raw_cond
    device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    cuda = (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class Generator(nn.Module):
    """``forward(x, t, h, cond)`` is the backbone's; ``compute_loss(batch)`` and
    ``generate(raw_cond, ...)`` are what the trainer and the workloads call. One loss path and
    one sampling path for every workload (toy points, images, action chunks).

    Args:
        backbone: any ``(x, t, h, cond)`` module.
        objective: an ``Objective`` (held, not registered as a module).
        cond_encoder: maps the (normalised) raw condition to ``(B, C)``; ``None`` for
            unconditional data.
        shape: per-sample data shape (for ``generate``).
        normalizer: optional :class:`~jumpflow.normalizer.Normalizer` (checkpointed with the
            weights): the data key is normalised before the loss and unnormalised after
            sampling; a dict condition has every key the normalizer knows normalised before
            the encoder sees it.
        data_key, cond_key: where ``compute_loss`` finds the data and the raw condition in a batch.
        clip_sample: clamp generated samples (in normalised units) to ``[-clip, clip]``
            before unnormalising (``None``: off).
    """

    def __init__(self, backbone: nn.Module, objective: Objective, cond_encoder: nn.Module | None = None,
                 shape: tuple[int, ...] | None = None, normalizer: nn.Module | None = None,
                 data_key: str = "x", cond_key: str = "cond", clip_sample: float | None = None):
        super().__init__()
        if getattr(objective, "prediction", "native") == "data":
            backbone = DataPrediction(backbone, objective.from_data_prediction)
        self.backbone = backbone
        self.cond_encoder = cond_encoder
        self.objective = objective
        self.normalizer = normalizer
        self.data_key, self.cond_key, self.clip_sample = data_key, cond_key, clip_sample
        self.shape = tuple(shape) if shape is not None else getattr(backbone, "shape", None)
        self.aux = nn.ModuleDict(objective.extra_modules(backbone))
        for module in self.aux.values():
            # a distillation teacher is called with this generator's encoded condition: its
            # condition encoder becomes the teacher's (frozen) when the teacher is read
            share = getattr(module, "share_condition_on_read", None)
            if share is not None:
                share(cond_encoder)
        self.guidance_embed = None
        if getattr(objective, "guidance_input", False) and cond_encoder is not None:
            width = getattr(cond_encoder, "dim", None) or getattr(cond_encoder, "out_dim", None)
            if width is None:
                raise ValueError("guidance as an input needs a condition encoder with a known width (dim or out_dim)")
            self.guidance_embed = GuidanceEmbedding(int(width))
        # copies of the condition path for an objective whose target network has its own (TVM's EMA
        # target): made here, once the guidance embedding exists; they live in ``aux`` too
        condition_modules = getattr(objective, "extra_condition_modules", None)
        if condition_modules is not None:
            self.aux.update(condition_modules(cond_encoder, self.guidance_embed))
        self._encoded = None        # the last encode()'s input, for reencode_condition

    def guidance_condition(self, cond: Tensor, scale: Tensor, embed: nn.Module | None = None) -> Tensor:
        """``cond: (B, C)`` with the guidance scale ``scale: (B,)`` embedded into it (objectives
        that train with a sampled scale call this for training rows and at sampling). ``embed``:
        another copy of the guidance embedding (an EMA target's), else the generator's own."""
        embed = self.guidance_embed if embed is None else embed
        if embed is None:
            raise ValueError("this generator takes no guidance input (its objective has guidance_input = False)")
        return cond + embed(scale.to(cond.device)).to(cond.dtype)

    # -- the net interface objectives call ------------------------------------------------
    @property
    def grouped_condition(self) -> bool:
        """Whether ``forward`` takes ``t, h, cond`` once per group of consecutive rows (the
        backbone's ``grouped_condition``; ``backbones.layers.per_row``)."""
        return bool(getattr(self.backbone, "grouped_condition", False))

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None, **kw):
        return self.backbone(x, t, h, cond, **kw)

    def null_cond(self, cond: Tensor) -> Tensor:
        null = getattr(self.cond_encoder, "null", None)
        if null is None:
            raise ValueError("this generator's condition encoder has no null condition (needed for guidance)")
        return null(cond)

    def tokenize(self, x: Tensor) -> Tensor:
        return self.backbone.tokenize(x)

    def untokenize(self, tokens: Tensor) -> Tensor:
        return self.backbone.untokenize(tokens)

    # -- data and condition paths ---------------------------------------------------------
    def normalize_data(self, x: Tensor) -> Tensor:
        if self.normalizer is None or self.data_key not in self.normalizer:
            return x
        return self.normalizer.normalize(self.data_key, x)

    def unnormalize_data(self, x: Tensor) -> Tensor:
        if self.clip_sample is not None:
            x = x.clamp(-self.clip_sample, self.clip_sample)
        if self.normalizer is None or self.data_key not in self.normalizer:
            return x
        return self.normalizer.unnormalize(self.data_key, x)

    def encode(self, raw_cond) -> Tensor | None:
        """Raw condition (labels, or a dict of raw observations) -> ``(B, C)``."""
        if raw_cond is None or self.cond_encoder is None:
            return None
        if isinstance(raw_cond, dict) and self.normalizer is not None:
            raw_cond = {k: (self.normalizer.normalize(k, v.float()) if k in self.normalizer else v)
                        for k, v in raw_cond.items()}
        if not getattr(self.objective, "reencodes_condition", False):
            return self.cond_encoder(raw_cond)
        state = _rng_state(raw_cond)                   # before the encoder draws its random crops
        cond = self.cond_encoder(raw_cond)                                    # (B, C)
        self._encoded = (raw_cond, state, cond.shape[0], cond.shape[1])
        return cond

    def reencode_condition(self, cond: Tensor, encoder: nn.Module) -> Tensor:
        """The condition of the last :meth:`encode` (``cond: (B, C')``, its first ``C`` columns
        the encoder's, any later ones appended by a workload, e.g. ChunkPolicy's prefix) with the
        encoder's columns computed again by ``encoder`` (a copy of ``cond_encoder``, e.g. an EMA
        target's) from the same normalised raw condition under the same random state, so random
        crops match; the appended columns are kept (detached). Kept only for objectives with
        ``reencodes_condition = True``. -> ``(B, C')``."""
        if self._encoded is None:
            raise ValueError("reencode_condition needs a condition encoded by this generator first "
                             "(compute_loss / encode with an objective that sets reencodes_condition)")
        raw, state, rows, width = self._encoded
        if cond.shape[0] != rows or cond.shape[1] < width:
            raise ValueError(f"reencode_condition: cond has shape {tuple(cond.shape)}, the last encoded "
                             f"condition was ({rows}, {width})")
        devices = [state[1][0]] if state[1] is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1][1], state[1][0])
            feats = encoder(raw)                                              # (B, C)
        return torch.cat([feats, cond[:, width:].detach()], dim=1) if cond.shape[1] > width else feats

    # -- what the trainer and workloads call ----------------------------------------------
    def compute_loss(self, batch: dict) -> LossOutput:
        """``batch[data_key]: (B, *shape)`` raw data, optional ``batch[cond_key]`` raw condition.

        A batch of groups ``(B, P, *shape)`` (with conditions ``(B, P, ...)``, e.g. class blocks
        for Drifting) is flattened to ``B * P`` rows."""
        x, cond = self.prepare_batch(batch)
        return self.objective.loss(self, x, cond)

    def prepare_batch(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """``(normalised data (B, *shape), encoded condition (B, C) or None)`` of a raw batch."""
        if self.data_key not in batch:
            raise KeyError(f"batch has no {self.data_key!r}; it has {sorted(batch)}")
        x, cond = batch[self.data_key], batch.get(self.cond_key)
        if self.shape is not None and x.ndim == len(self.shape) + 2 and tuple(x.shape[2:]) == self.shape:
            x = x.flatten(0, 1)                                                   # (B*P, *shape)
            if isinstance(cond, Tensor):
                cond = cond.flatten(0, 1)
            elif isinstance(cond, dict):
                cond = {k: v.flatten(0, 1) for k, v in cond.items()}
        if self.shape is not None and tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"batch[{self.data_key!r}] has shape {tuple(x.shape)}, expected (B, "
                             f"{', '.join(map(str, self.shape))})")
        x = self.normalize_data(x)                                                # (B, *shape)
        if not torch.isfinite(x).all():
            raise ValueError(f"batch[{self.data_key!r}] contains NaN or inf")
        return x, self.encode(cond)

    @torch.no_grad()
    def sample_normalized(self, cond: Tensor | None, noise: Tensor,
                          inference: Inference | int | dict | None = None) -> Tensor:
        """The objective's sampler on encoded ``cond`` from ``noise``: normalised samples."""
        return self.objective.sample(self, noise, cond, inference)

    @torch.no_grad()
    def generate(self, raw_cond=None, n: int | None = None, steps: int | None = None, sampler: str | None = None,
                 guidance: float | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None, inference: Inference | None = None) -> Tensor:
        """Samples ``(B, *shape)`` in data units; ``B`` from ``raw_cond`` or ``n``. Inference
        settings (``steps``, ``sampler``, ``guidance``, or an ``inference`` value) default to the
        objective's."""
        inf = Inference(steps, sampler, guidance).over(Inference.of(inference))
        cond = self.encode(raw_cond)
        if noise is None:
            b = cond.shape[0] if cond is not None else n
            if b is None or self.shape is None:
                raise ValueError("generate needs raw_cond or n, and a known sample shape")
            p = next(self.parameters())
            noise = torch.randn((b, *self.shape), generator=generator, device=p.device, dtype=p.dtype)
        return self.unnormalize_data(self.sample_normalized(cond, noise, inf))
