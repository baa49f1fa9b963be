"""Image data for the image workload: ImageNet class folders (ADM centre crop), Stable
Diffusion VAE latents in a sharded resumable zarr store, MNIST padded to 32x32, and a
``fake`` dataset of the right shapes for smoke runs.

References: ADM centre crop (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
Synthesis", 2021, ``image_datasets.center_crop_arr``); latent diffusion with the SD VAE
``sd-vae-ft-mse`` scaled by 0.18215 (Rombach et al. 2022; DiT, Peebles & Xie 2023).

Every dataset yields dict items ``{"x": float32 (C, H, W), "cond": int64 ()}`` (the
``Generator.compute_loss`` batch): pixels in ``[-1, 1]``, latents already scaled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from jumpflow.io import atomic_write_text

LATENT_SCALE = 0.18215
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# pixels <-> uint8
# ---------------------------------------------------------------------------------------------
def to_uint8(x: Tensor) -> Tensor:
    """``[-1, 1]`` float ``(N, C, H, W)`` -> uint8 NHWC (the ADM ``.npz`` layout)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(x: Tensor | np.ndarray) -> Tensor:
    """uint8 ``(N, H, W, C)`` -> float ``(N, C, H, W)`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(x))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# ImageNet class-folder tree
# ---------------------------------------------------------------------------------------------
def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2x the target, resize with
    BICUBIC so the short side equals ``image_size``, then crop the centre. -> uint8 ``(S, S, 3)``."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (ImageNet's ``train/`` layout); labels are class folders in
    sorted order.

    Items: ``{"x": float32 (3, S, S) in [-1, 1], "cond": int64}``; ``hflip=True`` flips at
    random (ADM / DiT training). ``uint8=True`` returns ``x`` as uint8 ``(S, S, 3)``
    (for latent extraction and FID references).
    """

    def __init__(self, root: str | Path, image_size: int = 256, hflip: bool = False, uint8: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (task.root)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class>/<image>)")
        self.samples = [(p, i) for i, c in enumerate(self.classes)
                        for p in sorted((self.root / c).iterdir()) if p.suffix.lower() in IMAGE_EXTS]
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTS}")
        self.image_size, self.hflip, self.uint8 = image_size, hflip, uint8

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            arr = center_crop_arr(im.convert("RGB"), self.image_size)     # (S, S, 3) uint8
        if self.hflip and torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        arr = np.ascontiguousarray(arr)
        if self.uint8:
            return {"x": torch.from_numpy(arr), "cond": torch.tensor(label, dtype=torch.long)}
        return {"x": from_uint8(arr[None])[0], "cond": torch.tensor(label, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# VAE latents in zarr
# ---------------------------------------------------------------------------------------------
def load_vae(path: str | Path, device="cpu", dtype=torch.float32):
    """diffusers ``AutoencoderKL`` from a local folder (``config.json`` + weights); never
    fetched (``local_files_only``). Needs ``pip install 'jumpflow[images]'``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("VAE latents need diffusers: pip install 'jumpflow[images]'") from e
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json (task.vae_path; e.g. a local copy of "
                                "stabilityai/sd-vae-ft-mse)")
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


class LatentStore:
    """A sharded, resumable zarr (v3) store of VAE latents.

    Layout: arrays ``latents (N, 4, S/8, S/8) float32`` (chunked by shard), ``labels (N,)
    int64``, ``done (n_shards,) bool``; attrs ``scale``, ``shard_size``, ``classes``,
    ``source``. A shard is written whole, then marked done, so an interrupted extraction
    resumes at the first shard not done and never duplicates or skips an image.
    """

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"latent store {self.path} does not exist (task.root)")
        self.root = zarr.open_group(str(self.path), mode="r")
        for key in ("latents", "labels", "done"):
            if key not in self.root:
                raise KeyError(f"{self.path}: missing array {key!r}; not a jumpflow latent store")

    @property
    def complete(self) -> bool:
        return bool(np.asarray(self.root["done"][:]).all())


def extract_latents(dataset: Dataset, out: str | Path, vae_path: str | Path | None = None,
                    encode: Callable[[Tensor], Tensor] | None = None, shard_size: int = 1024,
                    batch_size: int = 64, device: str = "cpu", sample: bool = False,
                    max_shards: int | None = None, progress: bool = True) -> Path:
    """Encode every image of ``dataset`` (items ``{"x": (3, S, S) in [-1, 1], "cond"}``) into
    ``out`` (a ``LatentStore``), resuming where a previous run stopped.

    ``encode(x: (B, 3, S, S)) -> (B, 4, S/8, S/8)`` defaults to the VAE posterior mean
    (``sample=True``: a posterior sample) times ``0.18215``; pass your own for tests.
    ``max_shards`` stops after that many new shards (to test resumption).
    """
    import zarr

    out = Path(out)
    if encode is None:
        if vae_path is None:
            raise ValueError("extract_latents needs vae_path (a local AutoencoderKL folder) or encode")
        vae = load_vae(vae_path, device)

        @torch.no_grad()
        def encode(x):
            dist = vae.encode(x.to(device)).latent_dist
            return (dist.sample() if sample else dist.mean) * LATENT_SCALE

    n = len(dataset)
    n_shards = math.ceil(n / shard_size)
    probe = encode(dataset[0]["x"][None])
    lat_shape = tuple(probe.shape[1:])
    if not (out / "zarr.json").exists():
        root = zarr.open_group(str(out), mode="w")
        root.create_array("latents", shape=(n, *lat_shape), chunks=(shard_size, *lat_shape), dtype="float32")
        root.create_array("labels", shape=(n,), chunks=(shard_size,), dtype="int64")
        root.create_array("done", shape=(n_shards,), chunks=(n_shards,), dtype="bool", fill_value=False)
        root.attrs.update({"scale": LATENT_SCALE, "shard_size": shard_size, "n": n,
                           "classes": list(getattr(dataset, "classes", [])),
                           "source": str(getattr(dataset, "root", ""))})
    root = zarr.open_group(str(out), mode="r+")
    if root.attrs.get("n") != n or root.attrs.get("shard_size") != shard_size:
        raise ValueError(f"{out}: existing store has n={root.attrs.get('n')}, shard_size="
                         f"{root.attrs.get('shard_size')}; this run has n={n}, shard_size={shard_size}")
    done = np.asarray(root["done"][:])
    written = 0
    for s in range(n_shards):
        if done[s]:
            continue
        if max_shards is not None and written >= max_shards:
            break
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        lat, lab = [], []
        for b in range(lo, hi, batch_size):
            items = [dataset[i] for i in range(b, min(hi, b + batch_size))]
            x = torch.stack([it["x"] for it in items])
            lat.append(encode(x).float().cpu())
            lab.append(torch.stack([it["cond"] for it in items]))
        root["latents"][lo:hi] = torch.cat(lat).numpy()
        root["labels"][lo:hi] = torch.cat(lab).numpy()
        root["done"][s] = True                       # only after the shard's data is stored
        written += 1
        if progress:
            print(f"latents: shard {s + 1}/{n_shards} ({hi} images)", flush=True)
    return out


class LatentDataset(Dataset):
    """Items from a complete ``LatentStore``: ``{"x": (4, s, s) float32, "cond": int64}``;
    ``hflip=True`` flips latents at random (as DiT's latent flip augmentation)."""

    def __init__(self, path: str | Path, hflip: bool = False, in_memory: bool = True):
        store = LatentStore(path)
        if not store.complete:
            raise ValueError(f"{path}: latent extraction is incomplete; rerun extract_latents to resume")
        self.latents = np.asarray(store.root["latents"][:]) if in_memory else store.root["latents"]
        self.labels = np.asarray(store.root["labels"][:])
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(np.asarray(self.latents[i], dtype=np.float32))
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x, "cond": torch.tensor(int(self.labels[i]), dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# MNIST (the CPU benchmark) and fake data
# ---------------------------------------------------------------------------------------------
#: md5 of the official .gz files (the checksums torchvision expects)
MNIST_TEST_MD5 = {"t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                  "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"}


def _read_idx(path: Path, verify_md5: bool = True) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian magic ``0x0000 08 ndim``, dims, uint8 data)."""
    import gzip
    import hashlib

    raw_bytes = path.read_bytes()
    if path.suffix == ".gz":
        if verify_md5 and path.name[:-3] in MNIST_TEST_MD5 and hashlib.md5(raw_bytes).hexdigest() != MNIST_TEST_MD5[path.name[:-3]]:
            raise ValueError(f"{path}: md5 mismatch (corrupt MNIST file)")
        data = gzip.decompress(raw_bytes)
    else:
        data = raw_bytes
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(dims):
        raise ValueError(f"{path}: {arr.size} values for dims {dims}")
    return arr.reshape(dims)


def read_mnist_test(root: str | Path, verify_md5: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST's test set from ``<root>/MNIST/raw``: ``images uint8 (10000, 28, 28)``,
    ``labels int64 (10000,)``.

    Uses ``torchvision.datasets.MNIST(root, train=False, download=False)`` when torchvision
    finds its files (it wants them decompressed, training set included); otherwise reads the
    ``t10k-*-idx*-ubyte[.gz]`` IDX files directly (a read-only folder of the two ``.gz`` test
    files is enough). Never downloads.
    """
    raw = Path(root) / "MNIST" / "raw"
    try:
        from torchvision.datasets import MNIST

        ds = MNIST(root=str(root), train=False, download=False)
        return ds.data, ds.targets.long()
    except (RuntimeError, ImportError):
        pass
    found = {}
    for stem in MNIST_TEST_MD5:
        for cand in (raw / stem, raw / f"{stem}.gz"):
            if cand.is_file():
                found[stem] = cand
                break
        else:
            raise FileNotFoundError(f"MNIST test set not found: {raw}/{stem}[.gz] is missing (task.root); "
                                    "it is never downloaded")
    images = _read_idx(found["t10k-images-idx3-ubyte"], verify_md5)
    labels = _read_idx(found["t10k-labels-idx1-ubyte"], verify_md5)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise ValueError(f"{raw}: unexpected MNIST test shapes {images.shape}, {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(root: str | Path, split: str = "train", n_train: int = 8000, seed: int = 0,
               pad_to: int = 32, verify_md5: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST's official *test* set (the only one on these machines) split into ``n_train``
    training and ``10000 - n_train`` held-out digits by a fixed permutation (``seed``).

    Returns ``x: float32 (N, 1, 32, 32)`` in ``[-1, 1]`` (28x28 zero-padded by 2 on each side,
    background -1) and ``labels: int64 (N,)``. ``split``: ``"train"``, ``"heldout"`` or ``"all"``.
    Reads ``<root>/MNIST/raw`` (see ``read_mnist_test``); never downloads.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    images, labels = read_mnist_test(root, verify_md5)
    x = images.float() / 127.5 - 1.0                                  # (10000, 28, 28)
    pad = (pad_to - x.shape[-1]) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)[:, None]   # (N, 1, 32, 32)
    y = labels.long()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    idx = {"train": perm[:n_train], "heldout": perm[n_train:], "all": perm}[split]
    return x[idx].contiguous(), y[idx].contiguous()


class TensorImageDataset(Dataset):
    """Dict items from in-memory tensors ``x: (N, C, H, W)``, ``labels: (N,)``."""

    def __init__(self, x: Tensor, labels: Tensor):
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows, labels {labels.shape[0]}")
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "cond": self.labels[i]}


class FakeImageDataset(Dataset):
    """Deterministic random items of a given shape and number of classes, for smoke runs
    (``x``: a per-class mean pattern plus noise, so a model can learn something)."""

    def __init__(self, shape=(4, 32, 32), num_classes: int = 1000, n: int = 256, seed: int = 0):
        self.shape, self.num_classes, self.n, self.seed = tuple(int(s) for s in shape), int(num_classes), int(n), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        label = i % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        mean = torch.randn(self.shape, generator=torch.Generator().manual_seed(10_000 + label)) * 0.5
        x = (mean + 0.5 * torch.randn(self.shape, generator=g)).clamp(-3, 3)
        return {"x": x, "cond": torch.tensor(label, dtype=torch.long)}


def write_json_atomic(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))
