"""TVM guidance as in the official code (lumalabs/tvm ``TVMLoss`` / ``TVMWrapper``) and TVM's EMA
target covering the condition encoder: the guided loss against a float64 reference written from
the official equations, the beta sampler's law, guidance off = the earlier TVM bit for bit, the
target's condition features from the EMA encoder (random crops replayed), the hyper-parameter
checks, and beta = 1 / w at sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from jumpflow.backbones import build_backbone
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.normalizer import Normalizer
from jumpflow.objectives import TerminalVelocityMatching
from jumpflow.objectives.base import LossOutput, jvp_context, per_sample_mse
from jumpflow.objectives.tvm import GuidanceSampler
from jumpflow.policy.chunk_policy import ChunkPolicy
from jumpflow.policy.encoders import ObsEncoder
from jumpflow.timeconv import expand_like, interpolate, velocity

N_CLASSES, C_DIM = 4, 6


def _generator(objective, dtype=torch.float64, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    gen = Generator(build_backbone("MLP", (3,), C_DIM, width=24, depth=2), objective,
                    ClassEmbedding(N_CLASSES, C_DIM), shape=(3,))
    return gen.to(dtype)


def _randomize(module: nn.Module, std: float, seed: int) -> None:
    """Every parameter random (the backbone's FiLM and the guidance embedding's output layer are
    zero-initialised, which would hide the condition and beta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _ks_uniform(u: np.ndarray) -> float:
    u = np.sort(u)
    n = len(u)
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


# ================================================================== the guided loss vs the official equations
def _official_reference(gen: Generator, obj: TerminalVelocityMatching, x, labels, seed: int) -> torch.Tensor:
    """The per-sample loss of lumalabs/tvm ``TVMWrapper.forward`` (``do_scale_param`` = scale_output)
    in float64, from the generator's parts used as plain functions; ``dF/ds`` by central differences.
    The random draws are replayed in the loss's order (eps, times, beta and the dropout mask)."""
    torch.manual_seed(seed)
    eps = torch.randn_like(x)
    t, s, s_prime = obj.sample_times(x.shape[0], x.device, x.dtype)
    beta, dropped = obj.guidance_sampler(x.shape[0])
    gs = obj.guidance_sampler
    w = 1.0 / beta
    out = w if gs.scale_output else torch.ones_like(w)
    col = lambda a: a[:, None]

    enc, enc_ema = gen.cond_encoder, gen.aux["tvm_target_encoder"]
    g_live, g_ema = gen.guidance_embed, gen.aux["tvm_target_guidance"]
    null_live = enc.table.weight[N_CLASSES].expand(len(labels), C_DIM)
    null_ema = enc_ema.table.weight[N_CLASSES].expand(len(labels), C_DIM)
    # label dropout: null class, beta = 1 there (official: labels[uncond_sel] = 0; beta[uncond_sel] = 1)
    c = torch.where(col(dropped), null_live, enc(labels)) + g_live(beta)
    c_ema = torch.where(col(dropped), null_ema, enc_ema(labels)) + g_ema(beta)
    c_ema_uncond = null_ema + g_ema(torch.ones_like(beta))

    def F(z, t_, s_, cond):                                                # forward_model(x, t, s)
        return gen.backbone(z, t_, t_ - s_, cond)

    def F_ema(z, t_, s_, cond):
        return gen.aux["tvm_target"](z, t_, t_ - s_, cond)

    yt = (1 - col(t)) * x + col(t) * eps
    ys_prime = (1 - col(s_prime)) * x + col(s_prime) * eps
    v_target = eps - x
    h = 1e-5
    F_ts = F(yt, t, s, c)
    F_ts_grad = (F(yt, t, s + h, c) - F(yt, t, s - h, c)) / (2 * h)        # d/ds at fixed t
    f_ts = yt + col(s - t) * F_ts * col(out)
    df_ds = col(out) * (F_ts + col(s - t) * F_ts_grad)
    F_ss_from_fts = F_ema(f_ts, s, s, c_ema)
    F_ss_uncond = F_ema(ys_prime, s_prime, s_prime, c_ema_uncond)          # beta = 1, null label
    F_ss = F(ys_prime, s_prime, s_prime, c)
    if gs.scale_output:
        F_ss_from_fts = col(w) * F_ss_from_fts
        F_ss = col(w) * F_ss
    terminal = ((df_ds - F_ss_from_fts) * col(beta)).pow(2).mean(-1)
    v_target = col(w) * v_target + (1 - col(w)) * F_ss_uncond
    fm = ((F_ss - v_target) * col(beta)).pow(2).mean(-1)
    return terminal + fm


@pytest.mark.parametrize("guidance", [
    {"w_min": 1.0, "w_max": 4.0, "class_drop": 0.3},
    {"w_min": 1.5, "w_max": 3.0, "dist": "uniform_beta", "class_drop": 0.2, "scale_output": False},
])
def test_guided_loss_equals_the_official_equations(guidance):
    obj = TerminalVelocityMatching(guidance=guidance)
    gen = _generator(obj)
    _randomize(gen, 0.4, seed=1)                 # live and EMA copies all differ
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, N_CLASSES, (64,), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    loss = gen.compute_loss({"x": x, "cond": labels}).loss
    with torch.no_grad():
        ref = _official_reference(gen, obj, x, labels, seed=7)
    torch.manual_seed(7)
    torch.randn_like(x)
    obj.sample_times(64, "cpu", torch.float64)
    dropped = obj.guidance_sampler(64)[1]
    assert 0 < int(dropped.sum()) < 64                                     # both kinds of rows
    assert loss.shape == (64,)
    assert (loss.detach() - ref).abs().max() < 1e-6
    assert ref.abs().max() > 1e-2                                          # not a trivial zero


def test_guided_target_on_dropped_rows_is_the_plain_velocity():
    """``v_g = w v + (1 - w) u_null``: with ``beta = 1`` (a dropped label) it is ``v = eps - x``;
    with a constant EMA target ``u_null = c0`` it is ``c0 + w (v - c0)`` exactly (float64)."""
    c0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = {"tvm_target": lambda z, t, h, c: torch.zeros_like(z) + c0}

        def null_cond(self, cond):
            return torch.zeros_like(cond)

        def guidance_condition(self, cond, scale, embed=None):
            return torch.cat([cond, scale[:, None].to(cond)], 1)

        def forward(self, z, t, h, cond):
            return torch.zeros_like(z)                                     # F = 0: the fm loss is beta^2 v_g^2

    obj = TerminalVelocityMatching(guidance={"w_min": 1.0, "w_max": 5.0, "class_drop": 0.5, "scale_output": False},
                                   lambda_fm=1.0)
    x = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond = torch.ones(256, 2, dtype=torch.float64)
    torch.manual_seed(1)
    out = obj.loss(Net(), x, cond)
    torch.manual_seed(1)
    eps = torch.randn_like(x)
    obj.sample_times(256, "cpu", torch.float64)
    beta, dropped = obj.guidance_sampler(256)
    w = (1 / beta)[:, None]
    v = eps - x
    v_g = c0 + w * (v - c0)
    assert torch.allclose(v_g[dropped], v[dropped], rtol=0, atol=1e-15)
    # terminal: F = 0 so df/ds = 0 and the target is c0 (no output scale): beta^2 |c0|^2 mean
    l_tv = (c0 * beta[:, None]).pow(2).mean(1)
    l_fm = (v_g * beta[:, None]).pow(2).mean(1)
    assert (out.loss - (l_tv + l_fm)).abs().max() < 1e-12


# ================================================================== beta sampling
def test_beta_sampler_uniform_w_law_range_and_dropout():
    torch.manual_seed(0)
    n = 40_000
    beta, dropped = GuidanceSampler(w_min=1.5, w_max=4.0, dist="uniform_w", class_drop=0.1)(n)
    assert beta.dtype == torch.float64 and dropped.dtype == torch.bool
    assert torch.all(beta[dropped] == 1.0)
    frac = dropped.double().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    w = (1 / beta[~dropped]).numpy()
    assert w.min() >= 1.5 and w.max() <= 4.0
    assert _ks_uniform((w - 1.5) / 2.5) < 1.95 / math.sqrt(len(w))        # 0.1% critical value


def test_beta_sampler_uniform_beta_and_fixed_w():
    torch.manual_seed(1)
    n = 40_000
    beta, dropped = GuidanceSampler(w_min=1.0, w_max=10.0, dist="uniform_beta", class_drop=0.0)(n)
    assert not dropped.any()
    b = beta.numpy()
    assert b.min() > 0.1 and b.max() <= 1.0
    assert _ks_uniform((b - 0.1) / 0.9) < 1.95 / math.sqrt(n)
    beta, dropped = GuidanceSampler(w_min=2.0, w_max=2.0, class_drop=0.25)(1000)   # official fixed cfg
    assert torch.all(beta[~dropped] == 0.5) and torch.all(beta[dropped] == 1.0)


def test_training_embeds_the_sampled_beta_into_the_condition():
    obj = TerminalVelocityMatching(guidance={"w_min": 2.0, "w_max": 3.0, "class_drop": 0.0})
    gen = _generator(obj)
    seen = []
    gen.guidance_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x, labels = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, N_CLASSES, (32,))
    torch.manual_seed(4)
    out = gen.compute_loss({"x": x, "cond": labels})
    torch.manual_seed(4)
    torch.randn_like(x)
    obj.sample_times(32, "cpu", torch.float64)
    beta, _ = obj.guidance_sampler(32)
    assert len(seen) == 1 and torch.equal(seen[0], beta)                   # the live net gets beta = 1 / w
    assert 2.0 <= out.metrics["w_mean"] <= 3.0


# ================================================================== guidance off = the earlier TVM, bit for bit
def _earlier_tvm_loss(obj: TerminalVelocityMatching, net, x, cond) -> LossOutput:
    """TVM's loss as it was before guidance and the encoder's EMA (jumpflow, December 2026)."""
    b = x.shape[0]
    eps = torch.randn_like(x)
    t, s, t_fm = obj.sample_times(b, x.device, x.dtype)
    z_t = interpolate(x, eps, t)

    def jump_velocity(s_):
        return net(z_t, t, t - s_, cond)
    with jvp_context():
        F, dF_ds = torch.func.jvp(jump_velocity, (s,), (torch.ones_like(s),))
    f = z_t + expand_like(s - t, z_t) * F
    df_ds = F + expand_like(s - t, z_t) * dF_ds
    with torch.no_grad():
        target = net.aux["tvm_target"](f.detach(), s, torch.zeros_like(s), None if cond is None else cond.detach())
    l_tv = per_sample_mse(df_ds, target)
    if obj.adaptive_c is not None:
        l_tv = l_tv / (l_tv.detach() + obj.adaptive_c)
    z_fm = interpolate(x, eps, t_fm)
    l_fm = per_sample_mse(net(z_fm, t_fm, torch.zeros_like(t_fm), cond), velocity(x, eps))
    return LossOutput(l_tv + obj.lambda_fm * l_fm, {"terminal": l_tv.mean().item(), "fm": l_fm.mean().item()})


def _train_steps(gen: Generator, batch: dict, n: int) -> None:
    opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=1e-2)
    for i in range(n):
        torch.manual_seed(100 + i)
        loss = gen.compute_loss(batch).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        gen.objective.on_step_end(gen)


@pytest.mark.parametrize("case", ["unconditional", "conditional_live_encoder", "conditional_ema_encoder_at_init",
                                  "adaptive_data_prediction"])
def test_guidance_off_is_the_earlier_tvm_bit_for_bit(case):
    kwargs = {"conditional_live_encoder": {"target_encoder": False},
              "adaptive_data_prediction": {"adaptive_c": 0.1, "prediction": "data",
                                           "target_encoder": False}}.get(case, {})
    obj = TerminalVelocityMatching(**kwargs)
    assert obj.guidance_sampler is None and not obj.guidance_input and not obj.guidance_at_sampling
    torch.manual_seed(0)
    conditional = case != "unconditional"
    gen = Generator(build_backbone("MLP", (3,), C_DIM if conditional else 0, width=24, depth=2), obj,
                    ClassEmbedding(N_CLASSES, C_DIM) if conditional else None, shape=(3,))
    assert gen.guidance_embed is None and "tvm_target_guidance" not in gen.aux
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, N_CLASSES, (32,), generator=torch.Generator().manual_seed(2))
    batch = {"x": x, "cond": labels} if conditional else {"x": x}
    if case != "conditional_ema_encoder_at_init":       # (an EMA encoder that has moved changes the target)
        _train_steps(gen, batch, 3)
    gen.zero_grad()
    torch.manual_seed(9)
    new = gen.compute_loss(batch)
    new.loss.mean().backward()
    grads_new = [p.grad.clone() for p in gen.backbone.parameters()]
    rng_new = torch.get_rng_state()
    gen.zero_grad()
    torch.manual_seed(9)
    x_n, cond = gen.prepare_batch(batch)
    old = _earlier_tvm_loss(obj, gen, x_n, cond)
    old.loss.mean().backward()
    if case == "adaptive_data_prediction":
        # the weight now comes from the shared adaptive_loss_weight, w * l instead of l / (l + c):
        # equal to rounding, not bit for bit
        assert torch.allclose(new.loss, old.loss, rtol=1e-6, atol=0)
        assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(grads_new, gen.backbone.parameters()))
    else:
        assert torch.equal(new.loss, old.loss) and new.metrics == old.metrics
        assert all(torch.equal(a, p.grad) for a, p in zip(grads_new, gen.backbone.parameters()))
    assert torch.equal(rng_new, torch.get_rng_state())                     # no extra random draws


# ================================================================== the EMA target's condition encoder
def _capture_target_cond(gen: Generator) -> list:
    seen = []
    gen.aux["tvm_target"].register_forward_pre_hook(lambda m, a: seen.append(a[3].detach().clone()))
    return seen


def test_target_condition_comes_from_the_ema_encoder_and_guidance_embedding():
    obj = TerminalVelocityMatching(target_decay=0.75, guidance={"w_min": 2.0, "w_max": 2.0, "class_drop": 0.0})
    gen = _generator(obj)
    _randomize(gen.guidance_embed, 0.3, seed=5)
    gen.aux["tvm_target_guidance"].load_state_dict(gen.guidance_embed.state_dict())
    assert set(gen.aux) == {"tvm_target", "tvm_target_encoder", "tvm_target_guidance"}
    assert not any(p.requires_grad for p in gen.aux.parameters())
    seen = _capture_target_cond(gen)
    x, labels = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, N_CLASSES, (16,))
    batch = {"x": x, "cond": labels}
    half = lambda c: c.chunk(2)[0]
    gen.compute_loss(batch)
    before = half(seen[-1])
    ema_table = gen.aux["tvm_target_encoder"].table.weight.detach().clone()
    ema_guid = gen.aux["tvm_target_guidance"](torch.full((16,), 0.5, dtype=torch.float64))
    assert torch.allclose(before, ema_table[labels] + ema_guid, rtol=0, atol=1e-15)
    # the live condition path moves; the target's condition does not
    with torch.no_grad():
        gen.cond_encoder.table.weight.add_(1.0)
        gen.guidance_embed.mlp[-1].bias.add_(1.0)
    gen.compute_loss(batch)
    assert torch.equal(half(seen[-1]), before)
    # ... until the EMA update: lerp by 1 - decay
    obj.on_step_end(gen)
    gen.compute_loss(batch)
    live = gen.cond_encoder.table.weight[labels] + gen.guidance_embed(torch.full((16,), 0.5, dtype=torch.float64))
    expected = before + 0.25 * (live.detach() - before)
    assert torch.allclose(half(seen[-1]), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(half(seen[-1]), before)


def test_target_encoder_off_uses_the_live_features():
    obj = TerminalVelocityMatching(target_encoder=False)
    gen = _generator(obj)
    assert "tvm_target_encoder" not in gen.aux
    seen = _capture_target_cond(gen)
    labels = torch.randint(0, N_CLASSES, (8,))
    with torch.no_grad():
        gen.cond_encoder.table.weight.add_(1.0)
    gen.compute_loss({"x": torch.randn(8, 3, dtype=torch.float64), "cond": labels})
    assert torch.equal(seen[-1], gen.cond_encoder(labels).detach())


def _image_policy(prefix_max: int = 0) -> ChunkPolicy:
    torch.manual_seed(0)
    encoder = ObsEncoder({"agentview_image": (3, 12, 12), "state": (3,)}, 2, image_trunk="small_cnn",
                         crop_size=9, num_kp=4, image_feature_dim=8)
    norm = Normalizer.fit({"action": torch.linspace(-2, 2, 50)[:, None].expand(50, 2).numpy(),
                           "state": torch.randn(50, 3).numpy()})
    cond_dim = encoder.out_dim + ChunkPolicy.prefix_cond_dim(prefix_max, 2)
    return ChunkPolicy(encoder, build_backbone("MLP", (8, 2), cond_dim, width=32, depth=2),
                       TerminalVelocityMatching(target_decay=0.5), norm, 8, 2, 4, 2, prefix_max=prefix_max)


@pytest.mark.parametrize("prefix_max", [0, 2])
def test_image_policy_target_sees_the_ema_encoder_with_the_same_random_crops(prefix_max):
    policy = _image_policy(prefix_max).train()
    seen = _capture_target_cond(policy)
    live = []
    policy.cond_encoder.register_forward_hook(lambda m, a, out: live.append(out.detach().clone()))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": {"agentview_image": torch.rand(6, 2, 3, 12, 12, generator=g),
                     "state": torch.randn(6, 2, 3, generator=g)},
             "action": torch.randn(6, 8, 2, generator=g)}
    torch.manual_seed(3)
    policy.compute_loss(batch)
    crops_differ = not torch.equal(policy.encode(batch["obs"]), live[-2])      # random crops in training
    assert crops_differ
    width = policy.cond_encoder.out_dim
    assert torch.equal(seen[-1][:, :width], live[-2])   # EMA == live at init, the same crops replayed
    assert seen[-1].shape[1] == width + ChunkPolicy.prefix_cond_dim(prefix_max, 2)
    before = seen[-1].clone()
    with torch.no_grad():                               # move the live encoder: the target stays
        for p in policy.cond_encoder.parameters():
            p.add_(0.5)
    torch.manual_seed(3)
    policy.compute_loss(batch)
    assert torch.equal(seen[-1], before)                # same crops, same prefix draw, EMA features
    assert not torch.equal(live[-1], before[:, :width])
    policy.objective.on_step_end(policy)                # now it moves
    torch.manual_seed(3)
    policy.compute_loss(batch)
    assert not torch.equal(seen[-1][:, :width], before[:, :width])


def test_reencode_needs_a_recorded_condition():
    gen = _generator(TerminalVelocityMatching())
    with pytest.raises(ValueError, match="reencode_condition"):
        gen.objective.loss(gen, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, C_DIM, dtype=torch.float64))


# ================================================================== hyper-parameters
@pytest.mark.parametrize("kwargs,field", [
    ({"guidance": {"w_min": 0.0}}, r"guidance\.w_min/w_max"),
    ({"guidance": {"w_min": 3.0, "w_max": 2.0}}, r"guidance\.w_min/w_max"),
    ({"guidance": {"w_max": float("inf")}}, r"guidance\.w_max"),
    ({"guidance": {"w_max": 5000.0}}, r"guidance\.w_max"),
    ({"guidance": {"dist": "lognormal"}}, r"guidance\.dist"),
    ({"guidance": {"class_drop": 1.0}}, r"guidance\.class_drop"),
    ({"guidance": {"class_drop": -0.1}}, r"guidance\.class_drop"),
    ({"guidance": {"scale_output": "yes"}}, r"guidance\.scale_output"),
    ({"guidance": {"cfg": 2.0}}, r"guidance: unknown keys \['cfg'\]"),
    ({"guidance": 2.0}, "guidance"),
    ({"target_encoder": "no"}, "target_encoder"),
    ({"guidance": {}, "inference": {"guidance": 0.0}}, r"inference\.guidance"),
    ({"inference": {"guidance": 2.0}}, r"inference\.guidance"),      # guidance off: no w at sampling
])
def test_invalid_hyper_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TerminalVelocityMatching(**kwargs)


def test_guidance_needs_a_condition():
    obj = TerminalVelocityMatching(guidance={})
    torch.manual_seed(0)
    gen = Generator(build_backbone("MLP", (3,), 0, width=16, depth=1), obj, None, shape=(3,))
    with pytest.raises(ValueError, match="conditional"):
        gen.compute_loss({"x": torch.randn(4, 3)})


def test_config_composes_with_guidance():
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["objective=tvm", "run_dir=/nonexistent",
                                          "objective.guidance={w_min: 1.0, w_max: 3.0, class_drop: 0.1}",
                                          "+objective.inference.guidance=2.0"])
    obj = instantiate(cfg.objective)
    assert obj.guidance_sampler.w_max == 3.0 and obj.guidance_sampler.scale_output and obj.inference.guidance == 2.0
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        default = instantiate(compose("train", overrides=["objective=tvm", "run_dir=/nonexistent"]).objective)
    assert default.guidance_sampler is None and default.target_encoder


# ================================================================== sampling: beta = 1 / w, output times w
def test_sampling_with_w_passes_beta_one_over_w_and_scales_the_output():
    c0 = torch.tensor([0.25, -0.5, 1.0], dtype=torch.float64)
    seen = []

    class Net(nn.Module):
        def guidance_condition(self, cond, scale, embed=None):
            seen.append(scale.clone())
            return cond

        def forward(self, z, t, h, cond):
            return torch.zeros_like(z) + c0

    noise = torch.randn(5, 3, dtype=torch.float64)
    cond = torch.zeros(5, 2, dtype=torch.float64)
    for scale_output in (True, False):
        obj = TerminalVelocityMatching(guidance={"scale_output": scale_output}, inference={"guidance": 1.5})
        for w, steps in ((2.5, 1), (4.0, 2), (None, 1)):
            x = obj.sample(Net(), noise, cond, {"steps": steps, "guidance": w})
            w_used = 1.5 if w is None else w                                # the config's default
            assert torch.allclose(seen[-1], torch.full((5,), 1 / w_used, dtype=torch.float64), rtol=0, atol=1e-15)
            expected = noise - (w_used if scale_output else 1.0) * c0       # jumps of a constant velocity
            assert torch.allclose(x, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"inference\.guidance"):
        obj.sample(Net(), noise, cond, {"guidance": 0.0})


def test_generate_with_guidance_reaches_the_embedding_and_is_learned():
    obj = TerminalVelocityMatching(guidance={"w_min": 1.0, "w_max": 4.0, "class_drop": 0.2})
    gen = _generator(obj, dtype=torch.float32)
    seen = []
    gen.guidance_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    labels, noise = torch.tensor([0, 1, 2, 3]), torch.randn(4, 3)
    same = [gen.generate(labels, noise=noise, guidance=w) for w in (1.0, 1.0)]
    assert torch.equal(same[0], same[1])
    assert torch.allclose(seen[-1].double(), torch.ones(4, dtype=torch.float64))
    gen.generate(labels, noise=noise, guidance=3.0)
    assert torch.allclose(seen[-1].double(), torch.full((4,), 1 / 3, dtype=torch.float64))
    x = torch.randn(64, 3) + torch.tensor([[2.0, 0.0, 0.0]]) * (torch.arange(64) % 4)[:, None]
    _train_steps(gen, {"x": x, "cond": torch.arange(64) % 4}, 6)
    assert gen.guidance_embed.mlp[-1].weight.abs().sum() > 0                 # beta reached the net and learned
    a, b = (gen.generate(labels, noise=noise, guidance=w) for w in (1.0, 3.0))
    assert not torch.allclose(a, b)
