"""Frozen image feature encoders: the feature map ``phi`` of Drifting on images (Deng et al.,
"Generative Modeling via Drifting", arXiv 2602.04770: images need a strong frozen encoder,
pixel-space drift fails) and the classifier of the fast classifier-feature FID.

* ``SmallConvNet``: a 4-stage CNN the project trains itself on its own data (MNIST in the CPU
  benchmark): ``train_classifier``. As a drift feature map it returns multi-scale features
  (pooled stage activations, each block divided by ``sqrt(dim)`` so every scale weighs alike),
  or with ``per_location`` the official feature sets of every stage map
  (``location_feature_sets``: one drift field per location, per patch and per map statistic).
* ``ResNetFeatures``: a torchvision ResNet (18/34/50) with weights from a *local* file
  (``.safetensors`` or a plain-tensor ``.pth``; never downloaded), ``in_channels`` 3 for
  pixels or 4 for SD latents (a network the user trained on latents); multi-scale pooled
  features of its four stages.

Drifting's hook (``jumpflow.objectives.Drifting(feature_map=...)``) takes a zero-argument
factory; ``feature_encoder(kind, path, ...)`` returns the module, and a hydra config builds the
factory with ``_partial_: true``::

    feature_map:
      _target_: jumpflow.images.encoders.feature_encoder
      _partial_: true
      kind: resnet50
      path: /data/weights/resnet50_latent.safetensors
      in_channels: 4

All encoders take ``x: (B, C, H, W)`` (pixels in ``[-1, 1]`` or scaled latents) and return
``(B, D)``; gradients flow to ``x`` (the loss differentiates through ``phi``), never to the
frozen weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from jumpflow.errors import ConfigError


def location_feature_sets(x: Tensor, maps: list[Tensor], patch_sizes=(2, 4), eps: float = 1e-6) -> list[Tensor]:
    """Drifting's feature sets of an input ``x: (B, C, H, W)`` and the encoder's feature maps
    ``[(B, C_i, H_i, W_i)]``, as the official ``get_activations`` builds them (Deng et al.,
    arXiv 2602.04770, Sec. A; lambertae/drifting ``models/mae_model.py``): blocks ``(B, T, C)``
    of ``T`` vectors, each vector its own drift field (``Drifting`` folds ``T`` into its groups):

    * the input's per-channel norm ``sqrt(mean_hw x^2 + eps)``, ``(B, 1, C)``;
    * per map: its locations ``(B, H_i*W_i, C_i)``, its channel mean and std over locations
      ``(B, 1, C_i)``, and for each ``s`` in ``patch_sizes`` dividing ``H_i`` and ``W_i`` the mean
      and std of every ``s x s`` patch ``(B, H_i*W_i/s^2, C_i)``.

    The std is ``sqrt(var + eps)`` (biased variance), as the official ``safe_std``."""

    def std(a: Tensor, dim) -> Tensor:
        return a.var(dim, correction=0).add(eps).sqrt()

    sets = [x.pow(2).mean((2, 3)).add(eps).sqrt()[:, None]]                 # (B, 1, C)
    for fmap in maps:
        _, _, h, w = fmap.shape
        sets += [rearrange(fmap, "b c h w -> b (h w) c"),                    # (B, HW, C_i)
                 fmap.mean((2, 3))[:, None], std(fmap, (2, 3))[:, None]]     # (B, 1, C_i) each
        for s in patch_sizes:
            if h % s == 0 and w % s == 0:
                patches = rearrange(fmap, "b c (h s1) (w s2) -> b (h w) (s1 s2) c", s1=s, s2=s)
                sets += [patches.mean(2), std(patches, 2)]                   # (B, HW/s^2, C_i) each
    return sets


class SmallConvNet(nn.Module):
    """``(B, C, 32, 32) -> logits (B, num_classes)``; ``features(x)`` gives the penultimate
    ``(B, width*8)`` vector (classifier FID), ``drift_features(x)`` the multi-scale vector.

    Stages (for a 32x32 input): ``width`` @32, ``2w`` @16, ``4w`` @8, ``8w`` @4, global mean.
    GroupNorm (no batch statistics, so eval and train behave alike).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]

        def block(ci, co, stride):
            return nn.Sequential(nn.Conv2d(ci, co, 3, stride=stride, padding=1), nn.GroupNorm(min(8, co), co),
                                 nn.SiLU())

        self.stages = nn.ModuleList([block(in_channels, chans[0], 1), block(chans[0], chans[1], 2),
                                     block(chans[1], chans[2], 2), block(chans[2], chans[3], 2)])
        self.head = nn.Linear(chans[3], num_classes)
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)                                            # (B, C_i, H_i, W_i)
        return outs

    def features(self, x: Tensor) -> Tensor:
        return self.stage_outputs(x)[-1].mean((2, 3))                 # (B, 8w)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))                            # (B, num_classes)

    def drift_blocks(self, x: Tensor) -> list[Tensor]:
        """``x: (B, C, H, W)`` -> blocks ``(B, D_i)``: the input pooled to 8x8, stage 2 pooled to
        4x4, stage 3 to 2x2 and stage 4's global mean, each scaled by ``1/sqrt(D_i)``."""
        outs = self.stage_outputs(x)
        blocks = [F.adaptive_avg_pool2d(x, 8).flatten(1),
                  F.adaptive_avg_pool2d(outs[1], 4).flatten(1),
                  F.adaptive_avg_pool2d(outs[2], 2).flatten(1),
                  outs[3].mean((2, 3))]
        return [b / math.sqrt(b.shape[1]) for b in blocks]

    def drift_features(self, x: Tensor) -> Tensor:
        return torch.cat(self.drift_blocks(x), 1)                    # (B, D)

    def drift_location_sets(self, x: Tensor) -> list[Tensor]:
        """``location_feature_sets`` of the input and the four stage maps: ``[(B, T_i, C_i)]``."""
        return location_feature_sets(x, self.stage_outputs(x))


class SmallMLPNet(nn.Module):
    """A pixel MLP classifier ``(B, C, H, W) -> logits``: cheap on a CPU, where the backward
    pass of a conv encoder dominates a Drifting step. ``features(x)``: last hidden layer;
    ``drift_features(x)``: the input and every hidden layer, each scaled by ``1/sqrt(dim)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 256, image_size: int = 32):
        super().__init__()
        d = in_channels * image_size * image_size
        self.layers = nn.ModuleList([nn.Linear(d, 2 * width), nn.Linear(2 * width, width)])
        self.head = nn.Linear(width, num_classes)
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width

    def hidden(self, x: Tensor) -> list[Tensor]:
        h, outs = x.flatten(1), []
        for layer in self.layers:
            h = F.silu(layer(h))
            outs.append(h)                                            # (B, W_i)
        return outs

    def features(self, x: Tensor) -> Tensor:
        return self.hidden(x)[-1]                                     # (B, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def drift_blocks(self, x: Tensor) -> list[Tensor]:
        return [b / math.sqrt(b.shape[1]) for b in (x.flatten(1), *self.hidden(x))]   # [(B, D_i)]

    def drift_features(self, x: Tensor) -> Tensor:
        return torch.cat(self.drift_blocks(x), 1)                    # (B, D)


class DriftFeatures(nn.Module):
    """Wraps an encoder as a frozen drift feature map: ``forward(x) = encoder.drift_features(x)``
    (one concatenated ``(B, D)`` vector), or with ``separate_blocks`` the list of its blocks
    ``[(B, D_i)]``: Drifting then computes one drift field per block (each normalised on its
    own, as the paper does per feature) instead of one kernel over the concatenation; or with
    ``per_location`` the official feature sets ``[(B, T_i, C_i)]`` of its feature maps
    (``location_feature_sets``), one drift field per location, patch and map statistic."""

    def __init__(self, encoder: nn.Module, separate_blocks: bool = False, per_location: bool = False):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.separate_blocks, self.per_location = bool(separate_blocks), bool(per_location)
        if self.separate_blocks and not hasattr(encoder, "drift_blocks"):
            raise ValueError(f"separate_blocks: {type(encoder).__name__} has no drift_blocks()")
        if self.per_location and not hasattr(encoder, "drift_location_sets"):
            raise ConfigError("feature_map.per_location", f"{type(encoder).__name__} has no feature maps; use a conv "
                              "encoder (kind: convnet or resnet*)")

    def train(self, mode: bool = True):                                  # stays frozen in eval mode
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.per_location:
            return self.encoder.drift_location_sets(x)
        return self.encoder.drift_blocks(x) if self.separate_blocks else self.encoder.drift_features(x)


class ResNetFeatures(nn.Module):
    """torchvision ResNet as a multi-scale feature encoder: the four stages globally
    averaged and each scaled by ``1/sqrt(dim)``, concatenated -> ``(B, D)``.

    Input ``(B, in_channels, H, W)``; pixels in ``[-1, 1]`` are mapped to ImageNet's
    normalisation when ``in_channels == 3`` and ``imagenet_norm``; for latents
    (``in_channels == 4``) the first convolution is 3x3 stride 1 and there is no max pool.
    """

    def __init__(self, arch: str = "resnet50", in_channels: int = 3, imagenet_norm: bool = True):
        super().__init__()
        import torchvision

        if arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"arch must be resnet18/34/50/101, got {arch!r}")
        net = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.net, self.in_channels = net, in_channels
        self.imagenet_norm = imagenet_norm and in_channels == 3
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """The stem's map and the four stages' ``[(B, C_i, H_i, W_i)]``."""
        if self.imagenet_norm:
            x = ((x + 1) / 2 - self.mean) / self.std
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        outs = [x]
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            outs.append(x)                                              # (B, C_i, H_i, W_i)
        return outs

    def drift_blocks(self, x: Tensor) -> list[Tensor]:
        blocks = [fmap.mean((2, 3)) for fmap in self.stage_outputs(x)[1:]]   # [(B, C_i)]
        return [b / math.sqrt(b.shape[1]) for b in blocks]

    def drift_location_sets(self, x: Tensor) -> list[Tensor]:
        """``location_feature_sets`` of the input and the stem and stage maps (the official
        feature sets of its ResNet: ``conv1``, ``layer1..4``)."""
        return location_feature_sets(x, self.stage_outputs(x))

    def drift_features(self, x: Tensor) -> Tensor:
        return torch.cat(self.drift_blocks(x), 1)                    # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.drift_features(x)


def _load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> None:
    from jumpflow.eval.fid import load_state_dict_safely

    sd = load_state_dict_safely(path)
    try:
        module.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {type(module).__name__}: {str(e).splitlines()[0]}") from e


def feature_encoder(kind: str = "convnet", path: str | Path | None = None, in_channels: int = 1,
                    num_classes: int = 10, width: int = 32, imagenet_norm: bool = True,
                    separate_blocks: bool = False, per_location: bool = False) -> nn.Module:
    """A frozen drift feature map (``(B, C, H, W) -> (B, D)``, or a list of blocks).

    Args:
        kind: ``"convnet"`` (``SmallConvNet``) or ``"mlp"`` (``SmallMLPNet``), both trained by
            ``train_classifier``, or a torchvision
            ResNet name (``"resnet18"``, ``"resnet50"``, ...).
        path: local weights (``.safetensors`` / plain-tensor ``.pth``); required: a random
            encoder is no feature map.
        separate_blocks: return the blocks (one drift field each), see ``DriftFeatures``.
        per_location: return the official feature sets of the conv maps (one drift field per
            location, patch and map statistic), see ``location_feature_sets``.
    """
    if path is None:
        raise ValueError("feature_encoder: objective.feature_map.path must name a local weights file")
    if kind in ("convnet", "mlp"):
        enc = (SmallConvNet if kind == "convnet" else SmallMLPNet)(in_channels, num_classes, width)
        _load_weights(enc, path)
    else:
        enc = ResNetFeatures(kind, in_channels, imagenet_norm)
        # ImageNet checkpoints carry the classifier "fc" layer; it is unused here
        from jumpflow.eval.fid import load_state_dict_safely

        sd = {k.removeprefix("net."): v for k, v in load_state_dict_safely(path).items()}
        missing, _ = enc.net.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad:
            raise ValueError(f"{path}: weights lack {bad[:3]} for {kind} (in_channels={in_channels})")
    return DriftFeatures(enc, separate_blocks, per_location)


def save_weights(module: nn.Module, path: str | Path) -> Path:
    """Atomic ``.safetensors`` (or ``.pth``) of ``module.state_dict()``."""
    from safetensors.torch import save_file

    from jumpflow.io import atomic_write

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp) if path.suffix == ".safetensors" else torch.save(sd, tmp))


def train_classifier(x: Tensor, labels: Tensor, num_classes: int = 10, width: int = 32, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, augment: bool = True,
                     log_every: int = 0, arch: str = "convnet") -> nn.Module:
    """Train a ``SmallConvNet`` (``arch="convnet"``) or ``SmallMLPNet`` (``"mlp"``) classifier on ``x: (N, C, H, W)`` (``[-1, 1]``), ``labels: (N,)``
    with AdamW and random 2-pixel shifts; returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch not in ("convnet", "mlp"):
        raise ValueError(f"arch must be convnet or mlp, got {arch!r}")
    net = (SmallConvNet if arch == "convnet" else SmallMLPNet)(x.shape[1], num_classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], labels[idx]
            if augment:
                dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"classifier step {step}/{steps} loss {loss.item():.4f}", flush=True)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += (net(x[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / max(1, x.shape[0])


class ClassifierFeatures:
    """Callable for ``jumpflow.eval.fid.features_of``: uint8 ``(N, C, H, W)`` -> ``(N, D)``
    penultimate features of a trained ``SmallConvNet`` (classifier-feature FID)."""

    def __init__(self, net: SmallConvNet):
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[1] != self.net.in_channels and x.shape[1] == 3 and self.net.in_channels == 1:
            x = x.mean(1, keepdim=True)
        return self.net.features(x).double()


def main(argv=None) -> int:
    """Train the MNIST encoder / classifier on the 8k split and save it (``.safetensors``)."""
    import argparse

    from jumpflow.datasets.images import load_mnist

    p = argparse.ArgumentParser(prog="python -m jumpflow.images.encoders",
                                description="Train a frozen MNIST feature encoder (Drifting's phi; the classifier "
                                            "of the classifier-feature FID) on the 8,000-digit training split.")
    p.add_argument("--mnist-root", default="../shared/data", help="folder holding MNIST/raw")
    p.add_argument("--out", required=True, help="weights file (.safetensors)")
    p.add_argument("--arch", choices=("mlp", "convnet"), default="mlp")
    p.add_argument("--width", type=int, default=256, help="mlp: 256 (bench); convnet: 24 (FID classifier)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, y = load_mnist(args.mnist_root, "train")
    net = train_classifier(x, y, width=args.width, epochs=args.epochs, seed=args.seed, arch=args.arch)
    xh, yh = load_mnist(args.mnist_root, "heldout")
    print(f"held-out accuracy {accuracy(net, xh, yh):.4f}; saved {save_weights(net, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
