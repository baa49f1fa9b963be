"""Image workload: datasets (fake, ImageNet folder + ADM crop, MNIST IDX, resumable latent
zarr), the frozen Drifting encoder hook, ``jumpflow-sample`` (ADM .npz layout, resume without
duplicates or losses), the experiment configs and a fake-data training smoke run."""

from __future__ import annotations

import functools
import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jumpflow.cli.sample import merge_shards, sample_shards
from jumpflow.datasets import images as di

pytestmark = pytest.mark.xdist_group("images")   # one worker builds the module fixture

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- data
def test_fake_dataset_shapes_and_determinism():
    ds = di.FakeImageDataset((4, 8, 8), num_classes=7, n=20)
    a, b = ds[3], ds[3]
    assert a["x"].shape == (4, 8, 8) and a["x"].dtype == torch.float32
    assert int(a["cond"]) == 3 and a["cond"].dtype == torch.long
    assert torch.equal(a["x"], b["x"]) and len(ds) == 20


def test_uint8_round_trip():
    x = torch.rand(3, 3, 5, 5) * 2 - 1
    u = di.to_uint8(x)
    assert u.shape == (3, 5, 5, 3) and u.dtype == torch.uint8
    assert (di.from_uint8(u) - x).abs().max() <= 1 / 127.5 + 1e-6


def test_imagenet_folder_center_crop(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (h, w) in {"n01": (300, 500), "n02": (700, 260)}.items():
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.JPEG")
    (tmp_path / "n02" / "notes.txt").write_text("not an image")
    ds = di.ImageFolderDataset(tmp_path, image_size=64)
    assert ds.classes == ["n01", "n02"] and len(ds) == 4
    item = ds[3]
    assert item["x"].shape == (3, 64, 64) and int(item["cond"]) == 1
    assert -1.0 <= float(item["x"].min()) and float(item["x"].max()) <= 1.0
    crop = di.center_crop_arr(Image.new("RGB", (500, 300)), 64)
    assert crop.shape == (64, 64, 3)
    with pytest.raises(FileNotFoundError, match="task.root"):
        di.ImageFolderDataset(tmp_path / "missing")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_reader_split_and_padding(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    labels = np.arange(10000) % 10
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError, match="md5"):          # not the official files
        di.load_mnist(tmp_path, "train")
    xtr, ytr = di.load_mnist(tmp_path, "train", verify_md5=False)
    xho, yho = di.load_mnist(tmp_path, "heldout", verify_md5=False)
    assert xtr.shape == (8000, 1, 32, 32) and xho.shape == (2000, 1, 32, 32)
    assert float(xtr[:, :, :2].max()) == -1.0            # zero padding = background -1
    xall, yall = di.load_mnist(tmp_path, "all", verify_md5=False)
    assert torch.equal(torch.cat([xtr, xho]), xall) and torch.equal(torch.cat([ytr, yho]), yall)
    # the split is a permutation: every digit exactly once
    assert sorted(yall.tolist()) == sorted(labels.tolist())
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        di.load_mnist(tmp_path / "nothing")


def test_latent_extraction_resumes_without_duplicates(tmp_path):
    ds = di.FakeImageDataset((3, 16, 16), num_classes=5, n=23)
    calls = []

    def encode(x):                                        # (B, 3, 16, 16) -> (B, 4, 2, 2)
        calls.append(x.shape[0])
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled[:, :1] * 2], 1) * di.LATENT_SCALE

    full = di.extract_latents(ds, tmp_path / "full.zarr", encode=encode, shard_size=5, batch_size=2,
                              progress=False)
    part = tmp_path / "part.zarr"
    di.extract_latents(ds, part, encode=encode, shard_size=5, batch_size=2, max_shards=2, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        di.LatentDataset(part)
    calls.clear()
    di.extract_latents(ds, part, encode=encode, shard_size=5, batch_size=2, progress=False)
    assert sum(calls) == 1 + 23 - 10                      # probe + the 3 missing shards only
    a, b = di.LatentDataset(full), di.LatentDataset(part)
    assert len(a) == len(b) == 23
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.labels, np.arange(23) % 5)
    assert b[7]["x"].shape == (4, 2, 2)
    with pytest.raises(ValueError, match="shard_size"):
        di.extract_latents(ds, part, encode=encode, shard_size=4, progress=False)


# ------------------------------------------------------------------------------------- Drifting encoder
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_frozen_drift_encoder_plugs_into_drifting(tmp_path, kind):
    from jumpflow.backbones import build_backbone
    from jumpflow.images.encoders import SmallConvNet, SmallMLPNet, feature_encoder, save_weights
    from jumpflow.images.task import ImageTask
    from jumpflow.objectives import Drifting

    torch.manual_seed(0)
    enc = SmallMLPNet(1, 10, 32) if kind == "mlp" else SmallConvNet(1, 10, 8)
    path = save_weights(enc, tmp_path / "enc.safetensors")
    task = ImageTask("fake", shape=(1, 32, 32), num_classes=10, cond_dim=16, image_size=32)
    obj = Drifting(gen_per_group=4, kernel="torch",
                   feature_map=functools.partial(feature_encoder, kind=kind, path=str(path), in_channels=1,
                                                 width=32 if kind == "mlp" else 8))
    model = task.build_model(build_backbone("MLP", (1, 32, 32), 16, width=64, depth=1), obj)
    phi = model.aux["feature_map"]
    assert not any(p.requires_grad for p in phi.parameters())
    model.train()
    assert not phi.training                               # stays frozen in eval mode
    x = torch.rand(12, 1, 32, 32) * 2 - 1
    out = model.compute_loss({"x": x, "cond": torch.arange(12) % 3})
    out.loss.mean().backward()
    assert out.loss.shape == (12,)
    assert all(p.grad is None for p in phi.parameters())
    assert model.backbone.out.weight.grad is not None and model.backbone.out.weight.grad.abs().sum() > 0
    # the blocks concatenate to the single feature vector
    assert torch.equal(torch.cat(enc.drift_blocks(x), 1), enc.drift_features(x))
    blocks = feature_encoder(kind=kind, path=str(path), in_channels=1, width=32 if kind == "mlp" else 8,
                             separate_blocks=True)(x)
    assert isinstance(blocks, list) and len(blocks) == (3 if kind == "mlp" else 4)
    with pytest.raises(ValueError, match="feature_map.path"):
        feature_encoder(kind)


def test_resnet_encoder_local_weights(tmp_path):
    from jumpflow.images.encoders import ResNetFeatures, feature_encoder, save_weights

    net = ResNetFeatures("resnet18", in_channels=4)
    path = save_weights(net.net, tmp_path / "r18.safetensors")
    phi = feature_encoder("resnet18", path, in_channels=4)
    f = phi(torch.randn(2, 4, 32, 32))
    assert f.shape == (2, 64 + 128 + 256 + 512)


def test_class_grouped_dataset_blocks():
    from jumpflow.images.task import ImageTask

    task = ImageTask("fake", shape=(4, 8, 8), num_classes=5, cond_dim=8, image_size=64, group_size=3, fake_size=30)
    ds = task.train_dataset()
    item = ds[7]
    assert item["x"].shape == (3, 4, 8, 8) and torch.equal(item["cond"], torch.full((3,), 2))


def test_image_task_shape_checks():
    from jumpflow.images.task import ImageTask

    with pytest.raises(ValueError, match="shape"):
        ImageTask("latents", root="x.zarr", shape=(4, 16, 16), image_size=256)
    with pytest.raises(ValueError, match="dataset"):
        ImageTask("cifar")
    with pytest.raises(ValueError, match="root"):
        ImageTask("mnist", shape=(1, 32, 32), image_size=32, num_classes=10)


# ------------------------------------------------------------------------------------- sampling
def _fake_generate(labels: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    noise = torch.randn((labels.shape[0], 3, 4, 4), generator=gen)
    x = torch.tanh(noise + labels[:, None, None, None].float() / 10)
    return di.to_uint8(x).numpy()


class _Interrupt(Exception):
    pass


def test_sample_shards_adm_layout_and_resume(tmp_path):
    n, k = 23, 10
    full = sample_shards(_fake_generate, n, k, tmp_path / "full", shard_size=5, batch_size=2, seed=3, progress=False)
    assert full.name == "samples_23x4x4x3.npz"
    with np.load(full) as f:
        assert set(f.files) == {"arr_0", "arr_1"}
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (23, 4, 4, 3)
    np.testing.assert_array_equal(y, np.arange(n) % k)     # class-balanced order

    calls = {"n": 0}

    def flaky(labels, gen):
        calls["n"] += 1
        if calls["n"] == 8:                                # dies inside the third shard (3 batches a shard)
            raise _Interrupt
        return _fake_generate(labels, gen)

    with pytest.raises(_Interrupt):
        sample_shards(flaky, n, k, tmp_path / "resumed", shard_size=5, batch_size=2, seed=3, progress=False)
    done = sorted(p.name for p in (tmp_path / "resumed").glob("shard_*.npz"))
    assert done == ["shard_00000.npz", "shard_00001.npz"]   # the partial shard was never written
    assert not list((tmp_path / "resumed").glob("*.tmp*"))
    calls["n"] = -100
    resumed = sample_shards(flaky, n, k, tmp_path / "resumed", shard_size=5, batch_size=2, seed=3, progress=False)
    assert calls["n"] == -100 + 8                           # only shards 2..4 (3 + 3 + 2 batches)
    with np.load(resumed) as f:
        np.testing.assert_array_equal(f["arr_0"], x)       # identical: no duplicates, no losses
        np.testing.assert_array_equal(f["arr_1"], y)
    with pytest.raises(ValueError, match="seed"):
        sample_shards(_fake_generate, n, k, tmp_path / "resumed", shard_size=5, seed=4, progress=False)
    (tmp_path / "resumed" / "shard_00002.npz").unlink()
    with pytest.raises(ValueError, match="missing shard"):
        merge_shards(tmp_path / "resumed", n)


# ------------------------------------------------------------------------------------- configs + trainer
IMAGE_OBJECTIVES = ("flow_matching", "meanflow", "tvm", "transition_matching", "drifting")
IMAGENET_RECIPES = ("imagenet256_latent", "imagenet256_pixel")


def test_imagenet_specializations_cover_the_paper_objectives():
    """Each paper objective has its ImageNet settings (configs/specialize/imagenet256/<objective>.yaml)
    and each ImageNet recipe names its paper targets."""
    for obj in IMAGE_OBJECTIVES:
        assert (REPO / "configs" / "specialize" / "imagenet256" / f"{obj}.yaml").exists()
    for recipe in IMAGENET_RECIPES:
        assert "FID" in (REPO / "configs" / "experiment" / f"{recipe}.yaml").read_text()


@pytest.mark.parametrize("objective", IMAGE_OBJECTIVES)
@pytest.mark.parametrize("recipe", IMAGENET_RECIPES)
def test_imagenet_recipe_composes_with_fake_data(recipe, objective):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"experiment={recipe}", f"objective={objective}", "data=fake"])
    task = instantiate(cfg.task)
    assert task.dataset == "fake" and task.cond_dim_follows_backbone
    assert list(task.shape) == ([4, 32, 32] if recipe.endswith("latent") else [3, 256, 256])
    assert cfg.trainer.batch_size >= 1 and cfg.optim.lr > 0
    if objective == "meanflow":
        assert cfg.objective.kappa == 0.5 and cfg.objective.class_drop_prob == 0.1     # MeanFlow B/2
    if objective == "drifting":
        assert cfg.task.group_size == 32 and cfg.objective.feature_map.in_channels == task.shape[0]


def _train(run_dir: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jumpflow.cli.train", f"hydra.run.dir={run_dir}", "logger=none",
           "trainer.progress=false", "trainer.cpu_threads=1", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _check_ran(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


TINY_DIT = ["experiment=imagenet256_latent", "objective=meanflow", "++backbone.depth=1", "++backbone.hidden_size=32",
            "++backbone.num_heads=2", "trainer.batch_size=2",
            "task.eval_samples=2", "++task.fake_size=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The shrunk DiT run, trained in this process through the one trainer (the ``jumpflow-train``
    entry point itself is tested in test_trainer.py and test_config.py; a subprocess here would
    only add a cold start)."""
    from hydra import compose, initialize_config_module

    from jumpflow.trainer import train

    run = tmp_path_factory.mktemp("img") / "run"
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"run_dir={run}", "logger=none", "trainer.progress=false",
                                          "trainer.cpu_threads=1", "data=fake", "trainer.max_steps=2", *TINY_DIT])
    result = train(cfg)
    assert result["step"] == 2
    return run


def test_fake_smoke_run_meanflow_dit_b2_config(tiny_run):
    """``experiment=imagenet256_latent objective=meanflow data=fake trainer.max_steps=2`` with the
    DiT shrunk (depth 1, width 32) so it runs in seconds; the full DiT-B/2 run is the slow test."""
    assert list((tiny_run / "checkpoints").glob("*.safetensors"))
    assert list((tiny_run / "samples").glob("*.png"))


def test_sample_cli_on_trained_run(tiny_run, tmp_path):
    from jumpflow.cli.sample import main as sample_main

    out = tmp_path / "samples"
    assert sample_main([str(tiny_run), "--out", str(out), "--n", "5", "--shard-size", "3", "--batch-size", "2",
                        "--nfe", "2", "--device", "cpu"]) == 0
    with np.load(out / "samples_5x32x32x3.npz") as f:     # fake latents, no VAE: 3 channels shown
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 32, 32, 3)
        np.testing.assert_array_equal(f["arr_1"], np.arange(5) % 1000)


@pytest.mark.slow
def test_fake_smoke_run_full_dit_b2():
    """The real DiT-B/2 (130M parameters) for 2 steps at batch 2 on CPU (minutes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        proc = _train(Path(d) / "run", "experiment=imagenet256_latent", "objective=meanflow", "data=fake",
                      "trainer.max_steps=2", "trainer.batch_size=2", "task.eval_samples=2", timeout=3000)
        _check_ran(proc)


def test_location_feature_sets_closed_form():
    """The official feature sets of a 4x4 map holding 0..15 (float64): the input's channel
    norm, the 16 locations in raster order, mean 7.5 and std sqrt(21.25 + eps), the 2x2 patch
    means 2.5 / 4.5 / 10.5 / 12.5 with std sqrt(4.25 + eps) each, the one 4x4 patch; a 6x6 map
    has no 4x4 patches."""
    from jumpflow.images.encoders import location_feature_sets

    eps = 1e-6
    x = torch.tensor([1.0, -3.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    fmap = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    sets = location_feature_sets(x, [fmap], eps=eps)
    norm, locs, mean, std, mean2, std2, mean4, std4 = sets
    assert torch.allclose(norm, torch.tensor([[[math.sqrt(1 + eps), math.sqrt(9 + eps)]]], dtype=torch.float64))
    assert torch.equal(locs, torch.arange(16, dtype=torch.float64).view(1, 16, 1))
    assert torch.allclose(mean, torch.full((1, 1, 1), 7.5, dtype=torch.float64))
    assert torch.allclose(std, torch.full((1, 1, 1), math.sqrt(21.25 + eps), dtype=torch.float64))
    assert torch.allclose(mean2, torch.tensor([2.5, 4.5, 10.5, 12.5], dtype=torch.float64).view(1, 4, 1))
    assert torch.allclose(std2, torch.full((1, 4, 1), math.sqrt(4.25 + eps), dtype=torch.float64))
    assert torch.allclose(mean4, mean) and torch.allclose(std4, std)
    six = location_feature_sets(x, [torch.zeros(1, 3, 6, 6, dtype=torch.float64)])
    assert [tuple(s.shape) for s in six] == [(1, 1, 2), (1, 36, 3), (1, 1, 3), (1, 1, 3), (1, 9, 3), (1, 9, 3)]


def test_per_location_drift_features_train_a_generator(tmp_path):
    """``feature_encoder(convnet, per_location=True)``: blocks ``(B, T, C)`` of the input and the
    four stage maps reach Drifting, whose loss moves the generator and not the frozen encoder;
    a pixel-MLP encoder has no maps and fails in one line naming per_location."""
    from jumpflow.backbones import build_backbone
    from jumpflow.images.encoders import SmallConvNet, SmallMLPNet, feature_encoder, save_weights
    from jumpflow.images.task import ImageTask
    from jumpflow.objectives import Drifting

    torch.manual_seed(0)
    path = save_weights(SmallConvNet(1, 10, 4), tmp_path / "enc.safetensors")
    make = functools.partial(feature_encoder, kind="convnet", path=str(path), in_channels=1, width=4, per_location=True)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    sets = make()(x)
    assert sets[0].shape == (6, 1, 1) and sets[1].shape == (6, 32 * 32, 4)             # input norm, stage 1 locations
    assert sum(s.shape[1] for s in sets) == 1 + sum(hw * hw + 2 + 2 * (hw // 2) ** 2 + 2 * (hw // 4) ** 2
                                                    for hw in (32, 16, 8, 4))
    task = ImageTask("fake", shape=(1, 32, 32), num_classes=10, cond_dim=16, image_size=32)
    obj = Drifting(gen_per_group=2, kernel="torch", feature_map=make)
    model = task.build_model(build_backbone("MLP", (1, 32, 32), 16, width=32, depth=1), obj)
    out = model.compute_loss({"x": x, "cond": torch.arange(6) % 2})
    out.loss.mean().backward()
    assert out.loss.shape == (4,) and torch.isfinite(out.loss).all() and float(out.loss.detach().min()) > 0
    assert all(p.grad is None for p in model.aux["feature_map"].parameters())
    assert model.backbone.out.weight.grad.abs().sum() > 0
    mlp = save_weights(SmallMLPNet(1, 10, 8), tmp_path / "mlp.safetensors")
    with pytest.raises(ValueError, match="^feature_map.per_location: SmallMLPNet has no feature maps"):
        feature_encoder("mlp", str(mlp), width=8, per_location=True)
