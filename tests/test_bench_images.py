"""bench/images: the backbone every row shares composes into the trained model's config."""

import argparse
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from bench.images import backbone_name, overrides_for
from jumpflow.backbones import MLP, UNet2D
from jumpflow.config import validate_config


def bench_args(**kw) -> argparse.Namespace:
    args = argparse.Namespace(steps=10, batch=8, threads=1, lr=1e-3, warmup=1, ema=0.9, width=64, depth=2,
                              cond_dim=16, data_root="data", seed=0, prediction="data", override=[], backbone="mlp",
                              unet_size="S", enc_arch="convnet", enc_width=8, drift_gen=4, drift_blocks="location")
    vars(args).update(kw)
    return args


@pytest.mark.parametrize("backbone, cls, name", [("mlp", MLP, "MLP width 64 depth 2"), ("unet2d", UNet2D, "UNet2D-S")])
@pytest.mark.parametrize("objective", ["meanflow", "drifting"])
def test_backbone_choice_builds_that_backbone(backbone, cls, name, objective):
    args = bench_args(backbone=backbone)
    overrides = overrides_for(objective, args, Path("enc.safetensors"), Path("run"))
    with initialize_config_module("configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    validate_config(cfg)                                       # the typed schemas accept it
    net = instantiate(cfg.backbone)
    assert isinstance(net, cls) and backbone_name(args).startswith(name)
    if backbone == "unet2d":                                   # the registry's S size, not the MLP's keys
        assert net.feature_dim == 64 and "width" not in cfg.backbone
    if objective == "drifting":
        assert cfg.objective.feature_map.per_location is True and cfg.objective.feature_map.kind == "convnet"
