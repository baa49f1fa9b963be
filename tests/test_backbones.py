"""Backbones: registry sizes, shapes, tokens, every backbone x every objective, and JVPs
(float64 finite differences) through DiT and UNet, including a backward through the JVP."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from jumpflow.backbones import BACKBONES, build_backbone, count_params
from jumpflow.backbones.dit import DiT
from jumpflow.backbones.embeddings import sinusoidal_embedding
from jumpflow.backbones.layers import add_plain, attention, modulate, scale_plain
from jumpflow.errors import ConfigError
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives.base import jvp_context

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "backbone"
COND_DIM, N_CLASSES = 8, 3

# tiny versions of each family: (registry name, per-sample shape, overrides)
TINY = {
    "dit2d": ("DiT-S/2", (4, 8, 8), {"hidden_size": 32, "depth": 2, "num_heads": 2}),
    "dit2d_lipschitz": ("DiT-S/2", (4, 8, 8), {"hidden_size": 32, "depth": 2, "num_heads": 2, "norm": "rmsnorm",
                                                   "qk_norm": True, "normalized_modulation": True, "swiglu": True,
                                                   "pos_embed": "learned"}),
    "dit1d": ("DiT1D-S", (8, 3), {"hidden_size": 32, "depth": 2, "num_heads": 2}),
    "unet1d": ("UNet1D-S", (8, 3), {"down_dims": (16, 32), "emb_dim": 32}),
    "unet1d_concat": ("UNet1D-S", (8, 3), {"down_dims": (16, 32), "emb_dim": 32, "cond_mode": "concat"}),
    # a horizon the three levels do not divide (Block Push h2), padded by repeating its last step
    "unet1d_pad": ("UNet1D-S", (2, 3), {"down_dims": (16, 32, 32), "emb_dim": 32, "pad_horizon": True}),
    "unet2d": ("UNet2D-S", (3, 8, 8), {"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                                          "attention_ds": (1, 2), "head_channels": 8}),
    "mlp": ("MLP", (8, 3), {"width": 32, "depth": 2}),
}


def tiny(key: str, cond_dim: int = COND_DIM, dtype=torch.float32, **extra):
    name, shape, kw = TINY[key]
    net = build_backbone(name, shape, cond_dim, **{**kw, **extra}).to(dtype)
    return net, shape


def perturb_(net: torch.nn.Module, std: float = 0.05) -> None:
    """adaLN-Zero / zero-init output layers make most gradients exactly zero at init; a small
    perturbation makes every parameter matter, so the checks below are not vacuous."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))


def inputs(shape, batch=3, dtype=torch.float32, cond_dim=COND_DIM):
    x = torch.randn(batch, *shape, dtype=dtype)
    t = torch.rand(batch, dtype=dtype)
    h = t * torch.rand(batch, dtype=dtype)
    cond = torch.randn(batch, cond_dim, dtype=dtype) if cond_dim else None
    return x, t, h, cond


# --------------------------------------------------------------------------------------
# registry, parameter counts, configs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, target", [("DiT-B/2", 130e6), ("DiT-XL/2", 675e6)])
def test_dit_param_counts_match_paper(name, target):
    n = count_params(name, (4, 32, 32), cond_dim=0)
    assert abs(n - target) / target < 0.03, (name, n)


def test_param_counts_ordered_and_meta_equals_real():
    dits = [count_params(n, (4, 32, 32)) for n in ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2")]
    assert dits == sorted(dits)
    unets = [count_params(n, (16, 7), cond_dim=46) for n in ("UNet1D-S", "UNet1D-M", "UNet1D-L")]
    assert unets == sorted(unets)
    assert 55e6 < unets[1] < 75e6          # Diffusion Policy's low-dim UNet is ~65M
    net, shape = tiny("unet2d")
    assert count_params(TINY["unet2d"][0], shape, COND_DIM, **TINY["unet2d"][2]) == \
        sum(p.numel() for p in net.parameters())


def test_every_registered_backbone_family_has_a_config():
    """One config per family (``configs/backbone/<family>.yaml``), the size a value."""
    files = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    families = {n.split("-")[0].lower() for n in BACKBONES}
    assert families == files


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_size_builds_from_its_family_config(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    family, _, size = name.partition("-")
    backbone_cfg = OmegaConf.load(CONFIG_DIR / f"{family.lower()}.yaml")
    assert backbone_cfg._target_ == "jumpflow.backbones.build_family" and backbone_cfg.family == family
    image = name.startswith("DiT-") or "2D" in name
    task = {"shape": [4, 32, 32] if image else [16, 7], "cond_dim": 16}
    cfg = OmegaConf.create({"task": task, "backbone": {**OmegaConf.to_container(backbone_cfg), "size": size or None}})
    with torch.device("meta"):
        net = instantiate(cfg.backbone)
    assert tuple(net.shape) == tuple(task["shape"])


def test_unknown_family_or_size_names_the_key():
    from jumpflow.backbones import build_family

    with pytest.raises(ValueError, match="^size: DiT has no size 'Q/9'; valid: B/2"):
        build_family("DiT", "Q/9", (4, 32, 32), 0)
    with pytest.raises(ValueError, match="^family: unknown backbone family 'Nope'"):
        build_family("Nope", "S", (16, 7), 0)


def test_unknown_name_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="^name: unknown backbone"):
        build_backbone("DiT-Q/3", (4, 8, 8))
    with pytest.raises(ValueError, match="^horizon: "):
        build_backbone("UNet1D-S", (10, 7))          # 10 is not divisible by 2**2
    with pytest.raises(ValueError, match="^patch_size: "):
        build_backbone("DiT-S/2", (4, 7, 7), hidden_size=32, depth=1, num_heads=2)
    net, shape = tiny("dit2d")
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 4, 16, 16), torch.rand(2), torch.rand(2), torch.randn(2, COND_DIM))
    with pytest.raises(ValueError, match="cond"):
        net(torch.randn(2, *shape), torch.rand(2), torch.rand(2), None)


# --------------------------------------------------------------------------------------
# shapes, tokens, features
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(TINY))
def test_output_shape_tokens_and_features(key):
    torch.manual_seed(0)
    net, shape = tiny(key)
    x, t, h, cond = inputs(shape)
    out, feats = net(x, t, h, cond, return_features=True)
    assert out.shape == x.shape
    tokens = net.tokenize(x)
    assert tokens.dim() == 3 and tokens.shape[0] == x.shape[0]
    assert torch.equal(net.untokenize(tokens), x)                        # exact round trip
    assert feats.shape == (x.shape[0], tokens.shape[1], net.feature_dim)
    assert torch.equal(net(x, t, h, cond), out)


def test_token_layouts():
    dit, _ = tiny("dit2d")                       # 2x2 patches of (4, 8, 8): 16 tokens of 16 values
    assert dit.tokenize(torch.zeros(2, 4, 8, 8)).shape == (2, 16, 16)
    x = torch.arange(4 * 8 * 8.0).reshape(1, 4, 8, 8)
    assert torch.equal(dit.tokenize(x)[0, 1, :4], x[0, :, 0, 2])        # token 1 = patch (0, 1), pixel (0, 0)
    dit1d, _ = tiny("dit1d")                     # one token per time step
    assert dit1d.tokenize(torch.zeros(2, 8, 3)).shape == (2, 8, 3)
    unet1d, _ = tiny("unet1d")
    assert unet1d.tokenize(torch.zeros(2, 8, 3)).shape == (2, 8, 3)
    unet2d, _ = tiny("unet2d")                   # one token per pixel
    assert unet2d.tokenize(torch.zeros(2, 3, 8, 8)).shape == (2, 64, 3)


def test_mlp_tokens_split_rows_and_add_position_and_own_input_to_the_features():
    """``tokens`` only changes the token view (ARTM's autoregression over a chunk's steps) and the
    features: the network's output is the same, each token is a row, and every token carries the
    shared features plus its own learned position embedding and a linear map of its own input values
    (none of it, and no parameter, at one token)."""
    torch.manual_seed(0)
    one = build_backbone("MLP", (8, 3), cond_dim=0, width=16, depth=1)
    torch.manual_seed(0)
    rows = build_backbone("MLP", (8, 3), cond_dim=0, width=16, depth=1, tokens=8)
    x = torch.randn(2, 8, 3)
    t = torch.rand(2)
    assert one.tokenize(x).shape == (2, 1, 24) and rows.tokenize(x).shape == (2, 8, 3)
    assert torch.equal(rows.tokenize(x)[:, 5], x[:, 5]) and torch.equal(rows.untokenize(rows.tokenize(x)), x)
    out1, f1 = one(x, t, t, return_features=True)
    out8, f8 = rows(x, t, t, return_features=True)
    assert torch.equal(out1, out8) and f8.shape == (2, 8, 16)
    own = x.reshape(2, 8, 3) @ rows.token_in.weight.T + rows.token_in.bias         # (B, N, W)
    assert torch.allclose(f8, f1.expand(-1, 8, -1) + rows.token_embed + own, atol=1e-6)
    assert not torch.allclose(f8[:, 0], f8[:, 1])                         # positions differ
    assert one.token_embed is None and one.token_in is None
    assert not any(k.startswith("token_") for k in one.state_dict())     # old checkpoints load
    f8.sum().backward()
    assert torch.equal(rows.token_embed.grad, torch.full((8, 16), 2.0))
    for bad in (0, 5, -1):
        with pytest.raises(ConfigError, match="tokens"):
            build_backbone("MLP", (8, 3), tokens=bad)


@pytest.mark.parametrize("key", ["dit2d", "dit1d", "unet1d", "unet2d", "mlp"])
def test_h_and_cond_change_the_output(key):
    torch.manual_seed(0)
    net, shape = tiny(key)
    perturb_(net)
    x, t, h, cond = inputs(shape)
    base = net(x, t, h, cond)
    assert not torch.allclose(base, net(x, t, h + 0.3, cond))
    assert not torch.allclose(base, net(x, t, h, cond + 1.0))


@pytest.mark.parametrize("key", list(TINY))
def test_grouped_condition_equals_repeated_rows_float64(key):
    """``t, h, cond`` once per group of consecutive rows (``layers.per_row``) is the same function,
    output, features and parameter gradients, as every row carrying its own copy."""
    torch.manual_seed(0)
    net, shape = tiny(key, dtype=torch.float64)
    perturb_(net)
    assert net.grouped_condition
    x, t, h, cond = inputs(shape, batch=2, dtype=torch.float64)
    x = torch.randn(6, *shape, dtype=torch.float64)                     # 3 samples per condition row
    results = []
    for tt, hh, cc in ((t, h, cond), (t.repeat_interleave(3), h.repeat_interleave(3), cond.repeat_interleave(3, 0))):
        net.zero_grad()
        out, feats = net(x, tt, hh, cc, return_features=True)
        (out.square().sum() + feats.sum()).backward()
        results.append((out, feats, [p.grad.clone() for p in net.parameters()]))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(o1[:3], o1[3:])                          # the two groups differ


@pytest.mark.parametrize("key", ["mlp", "unet1d", "unet1d_concat", "dit1d"])
def test_condition_rows_must_divide_the_batch(key):
    net, shape = tiny(key)
    x = torch.randn(6, *shape)
    t, cond = torch.rand(4), torch.randn(4, COND_DIM)
    with pytest.raises(ValueError, match="grouped conditioning"):
        net(x, t, t, cond)                                              # 4 rows do not divide 6
    with pytest.raises(ValueError, match="grouped conditioning"):
        net(x, torch.rand(2), torch.rand(2), torch.randn(3, COND_DIM))  # two different row counts
    assert net(x, torch.rand(1), torch.rand(1), torch.randn(3, COND_DIM)).shape == x.shape   # one row broadcasts


def test_unet1d_cond_modes_feed_film_as_written_float64():
    """``cond_mode="sum"``: FiLM reads ``emb(t) + emb(h) + Linear(cond)``; ``"concat"`` (Diffusion
    Policy's ``ConditionalUnet1D``): ``[emb(t) + emb(h), cond]``, the raw condition in the last
    ``cond_dim`` columns, so every block's FiLM linear is ``cond_dim`` wider."""
    torch.manual_seed(0)
    summed, shape = tiny("unet1d", dtype=torch.float64)
    concat, _ = tiny("unet1d_concat", dtype=torch.float64)
    _, t, h, cond = inputs(shape, batch=3, dtype=torch.float64)
    emb_th = concat.embed(t, h, None)                                   # (3, 32)
    torch.testing.assert_close(concat.condition(t, h, cond), torch.cat([emb_th, cond], dim=-1), rtol=0, atol=0)
    proj = summed.embed.cond_proj
    expected = summed.embed(t, h, cond)
    torch.testing.assert_close(expected, summed.embed.t_embed(t) + summed.embed.h_embed(h) + proj(cond),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed.condition(t, h, cond), expected, rtol=0, atol=0)
    film_in = {m: net.down[0][0].film[1].in_features for m, net in (("sum", summed), ("concat", concat))}
    assert film_in == {"sum": 32, "concat": 32 + COND_DIM}
    one_row = concat.condition(t[:1], h[:1], cond)                      # a single (t, h) row broadcasts
    torch.testing.assert_close(one_row[:, -COND_DIM:], cond, rtol=0, atol=0)
    torch.testing.assert_close(one_row[1, :32], emb_th[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cond_dim=8"):
        concat.condition(t, h, None)
    with pytest.raises(ConfigError, match="cond_mode"):
        build_backbone("UNet1D-S", (8, 3), COND_DIM, cond_mode="film")


def test_unet1d_pad_horizon_is_the_unpadded_net_on_the_repeated_last_step_float64():
    """``pad_horizon``: on a horizon of 2 under three levels (factor 4) the output and features are
    exactly the same weights at horizon 4 on the chunk with its last step repeated twice, cropped
    to the 2 real steps; without the option such a horizon is refused naming the fix."""
    torch.manual_seed(0)
    padded, shape = tiny("unet1d_pad", dtype=torch.float64)
    perturb_(padded)
    name, _, kw = TINY["unet1d_pad"]
    full = build_backbone(name, (4, 3), COND_DIM, **{**kw, "pad_horizon": False}).to(torch.float64)
    full.load_state_dict(padded.state_dict())
    x, t, h, cond = inputs(shape, batch=3, dtype=torch.float64)
    x4 = torch.cat([x, x[:, -1:], x[:, -1:]], dim=1)                     # (3, 4, 3)
    out, feats = padded(x, t, h, cond, return_features=True)
    out4, feats4 = full(x4, t, h, cond, return_features=True)
    assert out.shape == (3, 2, 3) and feats.shape == (3, 2, 16)
    torch.testing.assert_close(out, out4[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(feats, feats4[:, :2], rtol=0, atol=0)
    assert not torch.allclose(out4[:, :2], full(torch.cat([x, torch.zeros_like(x)], 1), t, h, cond)[:, :2])
    with pytest.raises(ConfigError, match="set backbone.pad_horizon=true"):
        build_backbone(name, shape, COND_DIM, **{**kw, "pad_horizon": False})


def test_dit_starts_as_zero_map():
    net, shape = tiny("dit2d")
    x, t, h, cond = inputs(shape)
    assert torch.count_nonzero(net(x, t, h, cond)) == 0                  # adaLN-Zero


def test_attention_paths_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(attention(q, k, v, "fused"), attention(q, k, v, "math"), atol=1e-12)
    net, shape = tiny("dit2d")
    perturb_(net)
    x, t, h, cond = inputs(shape)
    fused = net.set_attention("fused")(x, t, h, cond)
    math_ = net.set_attention("math")(x, t, h, cond)
    assert torch.allclose(fused, math_, atol=1e-5)
    with pytest.raises(ValueError, match="attn"):
        net.set_attention("flash")


# --------------------------------------------------------------------------------------
# JVP: equals a central finite difference (float64), through every attention path
# --------------------------------------------------------------------------------------
def _jvp_vs_fd(net, shape, context: bool):
    x, t, h, cond = inputs(shape, dtype=torch.float64)
    tx, tt, th, tc = torch.randn_like(x), torch.rand_like(t), torch.rand_like(h), torch.randn_like(cond)

    def f(x_, t_, h_, c_):
        return net(x_, t_, h_, c_)

    if context:
        with jvp_context():
            out, jv = torch.func.jvp(f, (x, t, h, cond), (tx, tt, th, tc))
    else:
        out, jv = torch.func.jvp(f, (x, t, h, cond), (tx, tt, th, tc))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * tx, t + eps * tt, h + eps * th, cond + eps * tc)
              - f(x - eps * tx, t - eps * tt, h - eps * th, cond - eps * tc)) / (2 * eps)
    assert torch.allclose(out, f(x, t, h, cond))
    rel = (jv - fd).norm() / fd.norm()
    assert fd.norm() > 0 and rel < 1e-6, float(rel)


@pytest.mark.parametrize("key", ["dit2d", "dit2d_lipschitz", "dit1d", "unet1d", "unet2d"])
def test_jvp_matches_finite_difference_float64(key):
    torch.manual_seed(0)
    net, shape = tiny(key, dtype=torch.float64)
    perturb_(net)
    _jvp_vs_fd(net, shape, context=True)


def test_fused_attention_is_jvp_safe_inside_jvp_context():
    """``attn="fused"`` calls SDPA even under a JVP; ``jvp_context`` restricts it to the math backend."""
    torch.manual_seed(0)
    net, shape = tiny("dit2d", dtype=torch.float64, attn="fused")
    perturb_(net)
    _jvp_vs_fd(net, shape, context=True)


@pytest.mark.parametrize("key, mode", [("dit2d", "auto"), ("dit2d", "math"), ("unet2d", "auto")])
def test_jvp_without_context_uses_the_math_attention(key, mode):
    """``attn="auto"`` detects the tangent and leaves the fused kernel (no forward AD on CPU)."""
    torch.manual_seed(0)
    net, shape = tiny(key, dtype=torch.float64, attn=mode)
    perturb_(net)
    _jvp_vs_fd(net, shape, context=False)


def test_forward_ad_dual_tensors_pass_through_dit():
    from torch.autograd import forward_ad as fwAD
    torch.manual_seed(0)
    net, shape = tiny("dit2d", dtype=torch.float64)
    perturb_(net)
    x, t, h, cond = inputs(shape, dtype=torch.float64)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        jv = fwAD.unpack_dual(net(fwAD.make_dual(x, tx), t, h, cond)).tangent
    _, ref = torch.func.jvp(lambda x_: net(x_, t, h, cond), (x,), (tx,))
    assert torch.allclose(jv, ref, atol=1e-12)


@pytest.mark.parametrize("key", ["dit2d", "dit2d_lipschitz", "dit1d", "unet1d", "unet2d"])
def test_backward_through_jvp_matches_finite_difference(key):
    """TVM differentiates a loss of the JVP: d/dx ||dF/dh||^2 by backprop vs finite difference."""
    torch.manual_seed(0)
    net, shape = tiny(key, dtype=torch.float64)
    perturb_(net)
    x, t, h, cond = inputs(shape, dtype=torch.float64)

    def loss_of(x_):
        with jvp_context():
            _, dF_dh = torch.func.jvp(lambda h_: net(x_, t, h_, cond), (h,), (torch.ones_like(h),))
        return dF_dh.pow(2).sum()

    xg = x.clone().requires_grad_(True)
    loss_of(xg).backward()
    direction = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        fd = (loss_of(x + eps * direction) - loss_of(x - eps * direction)) / (2 * eps)
    analytic = (xg.grad * direction).sum()
    assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), (float(analytic), float(fd))
    # every parameter but the output bias (a constant shift has no derivative) gets a gradient
    no_grad = {n for n, p in net.named_parameters() if p.grad is None}
    assert no_grad <= {"final_layer.linear.bias", "final_conv.bias", "out.bias"}, no_grad
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------
# every backbone x every objective
# --------------------------------------------------------------------------------------
OUTPUT_LAYERS = ("final_layer.linear.", "final_block.", "final_conv.", "out.", "out_norm.")
INPUT_LAYERS = ("inp.weight", "x_embed.weight", "down.0.0.block1.conv.weight", "down.0.0.skip.weight")


def _objective_names():
    mod = importlib.import_module("jumpflow.objectives")
    return sorted(getattr(mod, "OBJECTIVES", {}))


@pytest.mark.parametrize("objective", _objective_names())
@pytest.mark.parametrize("key", list(TINY))
def test_every_backbone_with_every_objective(key, objective):
    from jumpflow.objectives import OBJECTIVES
    torch.manual_seed(0)
    backbone, shape = tiny(key)
    perturb_(backbone)
    obj = OBJECTIVES[objective]()
    gen = Generator(backbone, obj, ClassEmbedding(N_CLASSES, COND_DIM), shape=shape)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(len(labels), *shape)
    out = gen.compute_loss({"x": x, "cond": labels})
    assert out.loss.dim() == 1 and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    # Transition Matching reads the backbone's features, never its output layer
    exempt = OUTPUT_LAYERS if objective == "transition_matching" else ()
    # regression feeds the backbone a constant zero sample: the weights acting on x see no signal
    exempt += INPUT_LAYERS if objective == "regression" else ()
    missing = [n for n, p in backbone.named_parameters() if not n.startswith(exempt) and
               (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert not missing, f"{objective} on {key}: no gradient for {missing[:5]}"
    obj.on_step_end(gen)
    steps = 1 if objective in ("drifting", "regression") else 2
    sample = gen.generate(labels[:4], steps=steps)
    assert sample.shape == (4, *shape) and torch.isfinite(sample).all()


def test_objective_registry_is_complete():
    assert set(_objective_names()) >= {"flow_matching", "meanflow", "tvm", "transition_matching",
                                       "drifting", "ddpm"}


def test_dit_is_a_dit():
    net, _ = tiny("dit1d")
    assert isinstance(net, DiT) and net.num_tokens == 8


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "convtranspose1d"])
def test_jvp_layers_exact_and_one_matmul_per_tangent(kind):
    """``layers.Linear`` / convolutions: the same JVP as torch's layers, but the tangent costs one
    product (torch's formulas also multiply by a materialised zero weight tangent)."""
    from torch.profiler import profile

    from jumpflow.backbones import layers
    torch.manual_seed(0)
    layer, x, ops = {
        "linear": (layers.Linear(16, 32), torch.randn(4, 5, 16), ("aten::mm", "aten::addmm")),
        "conv1d": (layers.Conv1d(16, 32, 5, padding=2), torch.randn(4, 16, 8), ("aten::convolution",)),
        "conv2d": (layers.Conv2d(16, 32, 3, padding=1), torch.randn(4, 16, 8, 8), ("aten::convolution",)),
        "convtranspose1d": (layers.ConvTranspose1d(16, 32, 4, stride=2, padding=1), torch.randn(4, 16, 8),
                            ("aten::convolution",)),
    }[kind]
    layer = layer.double()
    x = x.double()
    tx = torch.randn_like(x)
    reference = type(layer).__mro__[1].forward                         # the torch.nn parent's forward
    out_ref, jv_ref = torch.func.jvp(lambda x_: reference(layer, x_), (x,), (tx,))
    with torch.no_grad(), profile() as prof:
        out, jv = torch.func.jvp(layer, (x,), (tx,))
    assert torch.allclose(out, out_ref) and torch.allclose(jv, jv_ref)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert sum(counts.get(op, 0) for op in ops) == 2, counts            # primal + tangent


def _random_layer_norm(affine: bool):
    """A float64 ``layers.LayerNorm(8)`` with random scale and shift when affine (seed 0)."""
    from jumpflow.backbones.layers import LayerNorm
    torch.manual_seed(0)
    norm = LayerNorm(8, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.add_(torch.randn(8, dtype=torch.float64))
            norm.bias.add_(torch.randn(8, dtype=torch.float64))
    return norm


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_backward_through_jvp_is_exact(affine):
    """torch's fused layer_norm gets d/dx of its JVP wrong (pytorch/pytorch#196700);
    ``layers.LayerNorm`` matches finite differences and equals ``nn.LayerNorm`` otherwise."""
    norm = _random_layer_norm(affine)
    ref = torch.nn.LayerNorm(8, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        ref.load_state_dict(norm.state_dict())
    lin = torch.nn.Linear(8, 8).double()
    x, h = torch.randn(3, 8, dtype=torch.float64), torch.rand(3, 8, dtype=torch.float64)
    assert torch.allclose(norm(x), ref(x))

    def loss_of(x_):
        _, d = torch.func.jvp(lambda h_: norm(lin(x_ * h_)), (h,), (torch.ones_like(h),))
        return d.pow(2).sum()
    xg = x.clone().requires_grad_(True)
    loss_of(xg).backward()
    direction, eps = torch.randn_like(x), 1e-6
    with torch.no_grad():
        fd = (loss_of(x + eps * direction) - loss_of(x - eps * direction)) / (2 * eps)
    assert torch.allclose((xg.grad * direction).sum(), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_explicit_tangent_equals_the_composite_jvp(affine):
    """The explicit tangent ``r (dx - mean(dx) - x_hat mean(x_hat dx)) * gamma`` equals
    forward-mode AD through the plain formula, in float64."""
    norm = _random_layer_norm(affine)

    def composite(x_):
        xc = x_ - x_.mean(-1, keepdim=True)
        y = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)
        return y * norm.weight + norm.bias if affine else y
    x, tx = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    out, jv = torch.func.jvp(norm, (x,), (tx,))
    out_ref, jv_ref = torch.func.jvp(composite, (x,), (tx,))
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(jv, jv_ref, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 16, 8), (3, 16, 4, 4)])
def test_group_norm_jvp_equals_torch(shape):
    from jumpflow.backbones.layers import GroupNorm
    torch.manual_seed(0)
    norm = GroupNorm(4, 16).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(16, dtype=torch.float64))
        norm.bias.add_(torch.randn(16, dtype=torch.float64))
    x = torch.randn(*shape, dtype=torch.float64)
    tx = torch.randn_like(x)
    out, jv = torch.func.jvp(norm, (x,), (tx,))
    out_ref, jv_ref = torch.func.jvp(lambda x_: torch.nn.GroupNorm.forward(norm, x_), (x,), (tx,))
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(jv, jv_ref, atol=1e-10)


def test_sinusoidal_embedding_and_its_time_derivative_closed_form():
    """float64: features ``[cos(s f_k t), sin(s f_k t)]`` with ``f_k = P^(-k/half)`` and their exact
    derivative in ``t`` through ``torch.func.jvp`` (the embedding is the only path by which
    MeanFlow's ``du/dt`` sees time)."""
    t = torch.rand(7, dtype=torch.float64)
    half, scale = 8, 3.0
    freqs = scale * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    emb, d_emb = torch.func.jvp(lambda t_: sinusoidal_embedding(t_, 2 * half + 1, scale=scale), (t,),
                                (torch.ones_like(t),))
    phase = t[:, None] * freqs                                                    # (7, half)
    expect = torch.cat([phase.cos(), phase.sin(), torch.zeros(7, 1, dtype=torch.float64)], dim=-1)
    d_expect = torch.cat([-phase.sin() * freqs, phase.cos() * freqs, torch.zeros(7, 1, dtype=torch.float64)], -1)
    assert emb.shape == (7, 2 * half + 1)
    torch.testing.assert_close(emb, expect, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(d_emb, d_expect, rtol=1e-12, atol=1e-12)


def test_modulate_is_film_and_its_jvp_is_the_product_rule():
    """``modulate(x, a, b) = x (1 + a) + b``, and its tangent ``dx (1 + a) + x da + db`` (float64)."""
    g = torch.Generator().manual_seed(0)
    x, a, b, dx, da, db = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(6))
    out, d_out = torch.func.jvp(modulate, (x, a, b), (dx, da, db))
    torch.testing.assert_close(out, x * (1 + a) + b, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(d_out, dx * (1 + a) + x * da + db, rtol=1e-15, atol=1e-15)


def test_plain_add_and_scale_keep_the_exact_jvp_and_its_gradient():
    """``add_plain(x, c)`` and ``scale_plain(x, s)`` (the zero-tangent-free forms of ``x + c`` and
    ``x s``) give torch's value and tangent in float64, when ``c`` has a tangent too, and the same
    gradient of a loss on the tangent (TVM backpropagates through it)."""
    g = torch.Generator().manual_seed(1)
    x, dx, dc = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.randn(1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for fn, ref in ((lambda x_: add_plain(x_, c), lambda x_: x_ + c),
                    (lambda x_: scale_plain(torch.sin(x_), 2.5), lambda x_: torch.sin(x_) * 2.5)):
        (out, d_out), (out_ref, d_ref) = torch.func.jvp(fn, (x,), (dx,)), torch.func.jvp(ref, (x,), (dx,))
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        torch.testing.assert_close(d_out, d_ref, rtol=0, atol=0)
        xg = x.clone().requires_grad_(True)
        grads = [torch.autograd.grad((f(xg) ** 2).sum() + (torch.func.jvp(f, (xg,), (dx,))[1] * xg).sum(), (xg, c),
                                     allow_unused=True) for f in (fn, ref)]
        for mine, torch_s in zip(*grads):
            assert (mine is None) == (torch_s is None)
            if mine is not None:
                torch.testing.assert_close(mine, torch_s, rtol=1e-15, atol=1e-15)
    both = torch.func.jvp(lambda x_, c_: add_plain(x_, c_), (x, c.detach()), (dx, dc[:1]))[1]
    torch.testing.assert_close(both, dx + dc[:1], rtol=0, atol=0)


def test_jvp_ops_bench_times_equal_computations():
    """bench.jvp_ops compares like with like: in every case torch's form and jumpflow's give the
    same value and tangent."""
    from bench.jvp_ops import cases

    for name, (primals, tangents, torch_form, ours) in cases(batch=3, width=8).items():
        (a, da), (b, db) = torch.func.jvp(torch_form, primals, tangents), torch.func.jvp(ours, primals, tangents)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(db, da, rtol=1e-6, atol=1e-6, msg=name)
