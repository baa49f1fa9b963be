"""The image workload: class-conditional generation of images or VAE latents.

``ImageTask`` implements the trainer's ``Task`` contract (``jumpflow.tasks``) for four data
sources, chosen by ``dataset``:

* ``mnist``: MNIST's test set split 8k / 2k (``jumpflow.datasets.images.load_mnist``), (1, 32, 32);
* ``imagenet``: an ImageNet class-folder tree with ADM centre crop, pixels (3, S, S);
* ``latents``: a zarr store of SD-VAE latents (``extract_latents``), (4, S/8, S/8);
* ``fake``: random items of ``shape`` (smoke runs: ``data=fake`` in the experiment configs).

The model is a ``Generator`` with a ``ClassEmbedding`` (its extra row is the null class for
classifier-free guidance). ``evaluate`` samples a class-balanced grid at each NFE of
``eval_steps`` (decoded through the VAE for latents when ``vae_path`` is set) and, for MNIST
with ``fid_classifier`` set, a classifier-feature FID against the held-out digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from jumpflow.datasets.images import (
    LATENT_SCALE,
    FakeImageDataset,
    ImageFolderDataset,
    LatentDataset,
    TensorImageDataset,
    load_mnist,
    load_vae,
    to_uint8,
)
from jumpflow.errors import ConfigError
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.tasks import Task

DATASETS = ("mnist", "imagenet", "latents", "fake")
EXPECTED = {"mnist": lambda s: (1, 32, 32), "imagenet": lambda s: (3, s, s), "latents": lambda s: (4, s // 8, s // 8)}


class ImageTask(Task):
    """Class-conditional images.

    Args:
        dataset: ``mnist`` | ``imagenet`` | ``latents`` | ``fake``.
        root: MNIST root (holding ``MNIST/raw``), ImageNet ``train/`` folder, or latent zarr store.
        shape: per-sample ``(C, H, W)``; checked against the dataset (``fake`` takes it as given).
        num_classes: labels ``0..num_classes-1``; cond_dim: class-embedding width (``None``:
            the backbone's width, as DiT's class embedding is).
        image_size: pixel resolution (ImageNet crop; latents are ``image_size / 8``).
        hflip: random horizontal flips.
        fake_size: items of the fake dataset.
        vae_path: local ``AutoencoderKL`` folder to decode latents in ``evaluate`` (optional).
        eval_samples: samples per evaluated NFE; eval_steps: NFEs, e.g. ``[1, 2, 4]``.
        fid_classifier: MNIST only, a ``SmallConvNet`` weights file (``.safetensors``) for a
            classifier-feature FID against the 2k held-out digits.
        group_size: ``P > 1`` makes every training item a block of ``P`` images of one class
            (``x: (P, C, H, W)``, ``cond: (P,)``), flattened again by the model, so a random batch
            of ``B`` items holds ``B`` classes with ``P`` positives each: what Drifting needs
            (many positives per class; random ImageNet batches have ~0.25 per class).
    """

    def __init__(self, dataset: str = "fake", root: str | None = None, shape=(4, 32, 32), num_classes: int = 1000,
                 cond_dim: int | None = None, image_size: int = 256, hflip: bool = True, fake_size: int = 256,
                 vae_path: str | None = None, eval_samples: int = 100, eval_steps=(1,),
                 fid_classifier: str | None = None, group_size: int = 1):
        if dataset not in DATASETS:
            raise ConfigError("dataset", f"must be one of {', '.join(DATASETS)}, got {dataset!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ConfigError("shape", f"images need (C, H, W), got {list(shape)}")
        if dataset in EXPECTED and shape != EXPECTED[dataset](int(image_size)):
            raise ConfigError("shape", f"{list(shape)} does not match dataset {dataset} at image_size {image_size} "
                             f"(expected {list(EXPECTED[dataset](int(image_size)))})")
        if dataset != "fake" and not root:
            raise ConfigError("root", f"dataset {dataset} needs a path")
        if num_classes < 1:
            raise ConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if cond_dim is not None and cond_dim < 1:
            raise ConfigError("cond_dim", f"must be >= 1 or null (the backbone's width), got {cond_dim}")
        eval_steps = [int(s) for s in eval_steps]
        if not eval_steps or min(eval_steps) < 1:
            raise ConfigError("eval_steps", f"need integers >= 1, got {eval_steps}")
        self.dataset, self.root, self.shape = dataset, root, shape
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self.cond_dim = int(cond_dim) if cond_dim is not None else None
        self.cond_dim_follows_backbone = cond_dim is None
        self.hflip, self.fake_size, self.vae_path = bool(hflip), int(fake_size), vae_path
        self.eval_samples, self.eval_steps, self.fid_classifier = int(eval_samples), eval_steps, fid_classifier
        if group_size < 1:
            raise ConfigError("group_size", f"must be >= 1, got {group_size}")
        self.group_size = int(group_size)
        self._vae = None

    # -- the Task contract ---------------------------------------------------------------------
    def build_model(self, backbone: nn.Module, objective) -> nn.Module:
        # a class-block batch (B, P, C, H, W) is flattened by Generator.compute_loss
        return Generator(backbone, objective, ClassEmbedding(self.num_classes, self.cond_dim), shape=self.shape)

    def train_dataset(self) -> Dataset:
        base = self._base_dataset()
        return base if self.group_size == 1 else ClassGroupedDataset(base, self.group_size)

    def _base_dataset(self) -> Dataset:
        if self.dataset == "fake":
            return FakeImageDataset(self.shape, self.num_classes, self.fake_size)
        if self.dataset == "mnist":
            x, y = load_mnist(self.root, "train")
            return TensorImageDataset(x, y)
        if self.dataset == "imagenet":
            return ImageFolderDataset(self.root, self.image_size, hflip=self.hflip)
        return LatentDataset(self.root, hflip=self.hflip)

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model samples ``(B, C, H, W)`` -> pixels in ``[-1, 1]``; latents through the VAE
        (``x / 0.18215``) when ``vae_path`` is set, else their first three channels / 4."""
        if self.dataset == "latents" or (self.dataset == "fake" and self.shape[0] == 4):
            if self.vae_path:
                if self._vae is None:
                    self._vae = load_vae(self.vae_path, x.device)
                return self._vae.decode(x / LATENT_SCALE).sample.clamp(-1, 1)
            return (x[:, :3] / 4).clamp(-1, 1)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, run_dir, step: int) -> dict[str, float]:
        p = next(model.parameters())
        n = self.eval_samples
        labels = (torch.arange(n) % self.num_classes).to(p.device)
        out: dict[str, float] = {}
        run_dir = Path(run_dir)
        for steps in self.eval_steps:
            gen = torch.Generator(device=p.device).manual_seed(4321 + steps)
            noise = torch.randn((n, *self.shape), generator=gen, device=p.device, dtype=p.dtype)
            x = model.generate(labels, noise=noise, steps=steps)
            imgs = to_uint8(self.to_pixels(x.float())).cpu().numpy()
            save_grid_png(imgs, run_dir / "samples" / f"step{step:07d}_nfe{steps}.png", ncol=min(10, self.num_classes))
            out[f"sample_std_nfe{steps}"] = float(x.float().std())
            if self.dataset == "mnist" and self.fid_classifier:
                out[f"fid_classifier_nfe{steps}"] = self._classifier_fid(imgs)
        return out

    def _classifier_fid(self, imgs: np.ndarray) -> float:
        from jumpflow.eval.fid import feature_stats, features_of, frechet_distance
        from jumpflow.images.encoders import ClassifierFeatures, SmallConvNet, _load_weights

        if not hasattr(self, "_cls"):
            net = SmallConvNet(1, 10, width=24)
            _load_weights(net, self.fid_classifier)
            self._cls = ClassifierFeatures(net)
            x_ho, _ = load_mnist(self.root, "heldout")
            self._ref = feature_stats(features_of(to_uint8(x_ho).numpy(), self._cls))
        return frechet_distance(*feature_stats(features_of(imgs, self._cls)), *self._ref)


def _labels_of(ds: Dataset) -> np.ndarray:
    if isinstance(ds, TensorImageDataset):
        return ds.labels.numpy()
    if isinstance(ds, LatentDataset):
        return np.asarray(ds.labels)
    if isinstance(ds, ImageFolderDataset):
        return np.array([label for _, label in ds.samples])
    if isinstance(ds, FakeImageDataset):
        return np.arange(len(ds)) % ds.num_classes
    return np.array([int(ds[i]["cond"]) for i in range(len(ds))])


class ClassGroupedDataset(Dataset):
    """Item ``i``: ``group_size`` random images of class ``i % num_classes`` (drawn with the
    global torch RNG, which the trainer seeds per item) -> ``{"x": (P, C, H, W), "cond": (P,)}``.
    ``len = len(base) // group_size`` (one pass sees about every image once)."""

    def __init__(self, base: Dataset, group_size: int):
        self.base, self.group_size = base, group_size
        labels = _labels_of(base)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def __len__(self) -> int:
        return max(1, len(self.base) // self.group_size)

    def __getitem__(self, i: int) -> dict:
        members = self.by_class[i % len(self.by_class)]
        pick = members[torch.randint(0, len(members), (self.group_size,)).numpy()]
        items = [self.base[int(j)] for j in pick]
        return {"x": torch.stack([it["x"] for it in items]), "cond": torch.stack([it["cond"] for it in items])}


def save_grid_png(imgs: np.ndarray, path: str | Path, ncol: int = 10) -> Path:
    """uint8 NHWC images -> one PNG grid (atomic). Sample ``i`` has class ``i % ncol`` in the
    class-balanced order, so each column is one class."""
    from jumpflow.io import atomic_save_image

    n, h, w, c = imgs.shape
    nrow = int(np.ceil(n / ncol))
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = imgs[i]
    return atomic_save_image(path, grid)
