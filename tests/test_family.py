"""The one-step family beside MeanFlow: Regression, Shortcut, discrete (iCT) and continuous (sCT)
consistency training, alpha-Flow and improved MeanFlow. Closed-form answers in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from oracles import GaussianOracle, PointOracle, registered_objective_from_config
from torch import nn

from jumpflow.backbones.mlp import MLP
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import (
    OBJECTIVES,
    AlphaFlow,
    ConsistencyTraining,
    ContinuousConsistency,
    ImprovedMeanFlow,
    MeanFlow,
    Regression,
    Shortcut,
)
from jumpflow.objectives.consistency import consistency_function, pseudo_huber

F64 = torch.float64
NEW = ("regression", "shortcut", "consistency", "sct", "alpha_flow", "improved_meanflow")


# ---------------------------------------------------------------- oracles (exact fields)
X0 = torch.tensor([[0.7, -1.3]], dtype=F64)


def point_batch(n=64):
    return X0.expand(n, 2).clone()


def mlp_generator(obj, cond_classes=0, shape=(3,)):
    torch.manual_seed(0)
    enc = ClassEmbedding(cond_classes, 8) if cond_classes else None
    gen = Generator(MLP(shape, width=32, depth=2, cond_dim=8 if cond_classes else 0), obj, enc, shape=shape).double()
    with torch.no_grad():                      # leave the zero-initialised residual branches
        for p in gen.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return gen


def fd_dudt(net, z, t, h_of_t, tangent, e=1e-5):
    """Central difference of ``delta -> net(z + delta tangent, t + delta, h_of_t(t + delta))``."""
    def at(d):
        return net(z + d * tangent, t + d, h_of_t(t + d), None)
    return (at(e) - at(-e)) / (2 * e)


# ---------------------------------------------------------------- registry and configs
def test_registered_and_configs_instantiate():
    for name in NEW:
        obj = registered_objective_from_config(name, max_steps=1234)
        if name == "consistency":
            assert obj.curriculum_steps == 1234                  # the curriculum spans the run
        if name == "alpha_flow":
            assert obj.alpha_end_step == 1234


# ---------------------------------------------------------------- regression
def test_regression_lowers_its_loss_and_ignores_noise():
    torch.manual_seed(0)
    gen = Generator(MLP((2,), width=32, depth=2, cond_dim=8), Regression(), ClassEmbedding(2, 8))
    x = torch.tensor([[1.0, 0.5], [-1.0, -0.5]]).repeat(8, 1)
    labels = torch.tensor([0, 1]).repeat(8)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    before = gen.compute_loss({"x": x, "cond": labels}).loss.mean().item()
    for _ in range(50):
        loss = gen.compute_loss({"x": x, "cond": labels}).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gen.compute_loss({"x": x, "cond": labels}).loss.mean().item()
    assert after < 0.2 * before, (before, after)
    a = gen.generate(labels[:4], noise=torch.randn(4, 2))
    b = gen.generate(labels[:4], noise=torch.randn(4, 2) * 5)
    assert torch.equal(a, b)                                        # deterministic: the noise is ignored
    assert (a - x[:4]).abs().max() < 0.3


def test_regression_oracle_and_one_step_only():
    class Const(nn.Module):
        def forward(self, z, t, h, cond=None):
            assert torch.all(z == 0) and torch.all(t == 1) and torch.all(h == 1)
            return X0.expand_as(z)
    obj = Regression()
    assert obj.loss(Const(), point_batch(), None).loss.abs().max() == 0
    assert torch.equal(obj.sample(Const(), torch.randn(5, 2, dtype=F64), None), X0.expand(5, 2))
    with pytest.raises(ValueError, match="inference.steps"):
        obj.sample(Const(), torch.randn(5, 2, dtype=F64), None, 2)
    assert torch.equal(obj.from_data_prediction(None, None, X0), X0)


# ---------------------------------------------------------------- shortcut
def test_shortcut_target_is_two_exact_half_jumps():
    torch.manual_seed(0)
    oracle = GaussianOracle(0.8, 0.5)
    obj = Shortcut()
    z = torch.randn(6, 1, dtype=F64)
    t = torch.tensor([1.0, 1.0, 0.75, 0.5, 0.5, 0.25], dtype=F64)
    d = torch.tensor([0.5, 0.25, 0.125, 0.25, 1 / 64, 0.125], dtype=F64)
    target = obj.self_consistency_target(oracle, z, t, d, None)
    exact = (z - oracle.flow(z, t, t - 2 * d)) / (2 * d)[:, None]
    assert torch.allclose(target, exact, atol=1e-12)


def test_shortcut_jump_grid_and_smallest_step_is_the_flow():
    torch.manual_seed(0)
    obj = Shortcut(min_step=1 / 128)
    t, d = obj.sample_jumps(4000, "cpu", F64)
    full = 2 * d
    assert torch.all(t - full >= -1e-12) and torch.all(t <= 1)
    k = -torch.log2(full)
    assert torch.allclose(k, k.round()) and set(k.round().int().tolist()) == set(range(7))   # 1 .. 1/64
    assert torch.allclose((1 - t) / full, ((1 - t) / full).round())                          # t on the grid of 2d
    h = obj._h(torch.tensor([1 / 128, 1 / 64, 0.5], dtype=F64))
    assert h.tolist() == [0.0, 1 / 64, 0.5]


@pytest.mark.parametrize("target_decay", [0.99, None])
def test_shortcut_point_oracle_loss_zero_and_samples_exact(target_decay):
    obj = Shortcut(self_consistency_fraction=0.5, target_decay=target_decay,
                   time_sampler={"kind": "uniform", "low": 0.05})
    gen = Generator(PointOracle(X0), obj, shape=(2,))
    assert ("shortcut_target" in gen.aux) == (target_decay is not None)
    out = obj.loss(gen, point_batch(), None)
    assert out.loss.abs().max() < 1e-20 and "self_consistency" in out.metrics
    eps = torch.randn(16, 2, dtype=F64)
    gauss = GaussianOracle(0.8, 0.5)
    for steps in (1, 2, 4):
        assert torch.allclose(obj.sample(gen, eps, None, steps), X0.expand(16, 2), atol=1e-12)
        e1 = eps[:, :1]
        assert torch.allclose(obj.sample(gauss, e1, None, steps), 0.8 + 0.5 * e1, atol=1e-12)


def test_shortcut_ema_teacher_follows_on_step_end():
    obj = Shortcut(target_decay=0.75)
    gen = mlp_generator(obj)
    before = [p.clone() for p in gen.aux["shortcut_target"].parameters()]
    with torch.no_grad():
        for p in gen.backbone.parameters():
            p.add_(1.0)
    obj.on_step_end(gen)
    for p_t, p0, p in zip(gen.aux["shortcut_target"].parameters(), before, gen.backbone.parameters()):
        assert torch.allclose(p_t, 0.75 * p0 + 0.25 * p) and not p_t.requires_grad


# ---------------------------------------------------------------- consistency training (iCT)
def test_ict_curriculum_grid_and_level_sampler():
    obj = ConsistencyTraining(curriculum_steps=800)          # 8 stages of 100 steps: 10, 20, ..., 1280
    assert [obj.num_levels(k) for k in (0, 99, 100, 250, 699, 700, 10**6)] == [11, 11, 21, 41, 641, 1281, 1281]
    sig = obj.sigmas(11)
    assert abs(sig[0] - 0.002) < 1e-15 and abs(sig[-1] - 80.0) < 1e-9 and torch.all(sig[1:] > sig[:-1])
    p = obj.level_probs(obj.sigmas(1281))
    assert abs(p.sum().item() - 1) < 1e-12 and torch.all(p >= 0)
    # the discretised lognormal is the logit-normal of flow time t = sigma / (1 + sigma)
    s = obj.sigmas(1281)
    mid_t = (s[:-1] / (1 + s[:-1]))
    logit = torch.log(mid_t / (1 - mid_t))
    assert abs((p * logit).sum().item() - (-1.1)) < 0.05
    assert abs(obj.t_max - 80 / 81) < 1e-15


def test_ict_boundary_condition_and_pseudo_huber():
    gen = mlp_generator(ConsistencyTraining())
    z = torch.randn(4, 3, dtype=F64)
    assert torch.equal(consistency_function(gen, z, torch.zeros(4, dtype=F64), None), z)
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    assert torch.allclose(pseudo_huber(d, 0.5), torch.tensor([math.sqrt(25.25) - 0.5, 0.0], dtype=F64))


def test_ict_point_oracle_loss_zero_counter_and_samples():
    obj = ConsistencyTraining(curriculum_steps=10)
    gen = Generator(PointOracle(X0), obj, shape=(2,))
    out = obj.loss(gen, point_batch(), None)
    assert out.loss.abs().max() < 1e-12 and out.metrics["levels"] == 11
    for _ in range(3):
        obj.on_step_end(gen)
    assert int(gen.aux["consistency_step"].step) == 3
    assert "aux.consistency_step.step" in gen.state_dict()                 # checkpointed with the weights
    eps = torch.randn(16, 2, dtype=F64)
    for steps in (1, 2):
        assert torch.allclose(obj.sample(gen, eps, None, steps), X0.expand(16, 2), atol=1e-12)
    gauss = GaussianOracle(0.8, 0.5)
    t_max = torch.full((16,), obj.t_max, dtype=F64)
    e1 = eps[:, :1]
    expected = gauss.flow(obj.t_max * e1, t_max, torch.zeros_like(t_max))
    assert torch.allclose(obj.sample(gauss, e1, None, 1), expected, atol=1e-12)


# ---------------------------------------------------------------- continuous consistency (sCT)
def test_sct_jvp_matches_central_difference():
    torch.manual_seed(1)
    obj = ContinuousConsistency()
    gen = mlp_generator(obj)
    z = torch.randn(5, 3, dtype=F64)
    t = torch.rand(5, dtype=F64) * 0.8 + 0.1
    v = torch.randn(5, 3, dtype=F64)
    u, dudt = obj.tangent(gen, z, t, v, None)
    assert torch.allclose(u, gen(z, t, t, None), atol=1e-14)
    assert torch.allclose(dudt, fd_dudt(gen, z, t, lambda s: s, v), rtol=1e-6, atol=1e-8)


def test_sct_tangent_vanishes_on_the_exact_flow():
    """``df/dt = v - u - t du/dt = 0`` along the marginal velocity of Gaussian data, and the
    point oracle's loss is exactly zero."""
    torch.manual_seed(0)
    gauss = GaussianOracle(0.8, 0.5)
    obj = ContinuousConsistency(adaptive_weight="fixed", tangent_warmup_steps=0)
    z = torch.randn(64, 1, dtype=F64)
    t = torch.rand(64, dtype=F64) * 0.9 + 0.05
    v = gauss.velocity(z, t)
    u, dudt = obj.tangent(gauss, z, t, v, None)
    assert torch.allclose(v - u - t[:, None] * dudt, torch.zeros_like(v), atol=1e-10)
    for weight in ("fixed", "learned"):
        o = ContinuousConsistency(adaptive_weight=weight, time_sampler={"kind": "uniform", "low": 0.05})
        gen = Generator(PointOracle(X0), o, shape=(2,))
        assert o.loss(gen, point_batch(), None).loss.abs().max() < 1e-20
    eps = torch.randn(16, 1, dtype=F64)
    assert torch.allclose(obj.sample(gauss, eps, None, 1), 0.8 + 0.5 * eps, atol=1e-12)


def test_sct_normalised_tangent_weight_and_warmup():
    torch.manual_seed(0)
    obj = ContinuousConsistency(tangent_warmup_steps=4)
    gen = mlp_generator(obj)
    out = obj.loss(gen, torch.randn(8, 3, dtype=F64), None)
    # at w = 0 the loss is mean_D ||g / (||g|| + c)||^2 < 1 / D
    assert torch.all(out.loss < 1 / 3) and torch.all(out.loss > 0)
    out.loss.mean().backward()
    assert gen.aux["sct_weight"].linear.weight.grad.abs().sum() > 0           # w_phi is trained
    assert obj.warmup(gen) == 0.0
    for _ in range(2):
        obj.on_step_end(gen)
    assert obj.warmup(gen) == 0.5


# ---------------------------------------------------------------- alpha-Flow
@pytest.mark.parametrize("guided", [False, True])
def test_alpha_flow_equals_meanflow_at_alpha_zero(guided):
    kw = {"ratio_r_neq_t": 0.25}
    if guided:
        kw.update(omega=0.6, kappa=0.3, class_drop_prob=0.2)
    mf = MeanFlow(**kw)
    af = AlphaFlow(alpha_schedule="constant", alpha_start=0.0, **kw)
    gen = mlp_generator(mf, cond_classes=3 if guided else 0)
    x = torch.randn(32, 3, dtype=F64)
    cond = gen.encode(torch.arange(32) % 3) if guided else None
    torch.manual_seed(7)
    a = af.loss(gen, x, cond)
    torch.manual_seed(7)
    b = mf.loss(gen, x, cond)
    assert torch.equal(a.loss, b.loss) and a.metrics["alpha"] == 0.0


def test_alpha_flow_residual_tends_to_meanflow_as_alpha_to_zero():
    """``(u - u_tgt(alpha)) / alpha -> u - (v - (t - r) du/dt)``: error O(alpha)."""
    torch.manual_seed(0)
    af = AlphaFlow(alpha_schedule="constant", alpha_start=0.5)
    gen = mlp_generator(af)
    b = 6
    z, v = torch.randn(b, 3, dtype=F64), torch.randn(b, 3, dtype=F64)
    t = torch.rand(b, dtype=F64) * 0.6 + 0.3
    r = t * torch.rand(b, dtype=F64) * 0.9
    u, u_tgt_mf = af.prediction_and_target(gen, z, r, t, v, None)
    errs = []
    for alpha in (1e-3, 1e-4):
        u_tgt = af.alpha_target(gen, z, r, t, v, None, alpha)
        errs.append(((u - u_tgt) / alpha - (u - u_tgt_mf)).abs().max().item())
    assert errs[1] < 1e-3 and errs[1] < 0.2 * errs[0]
    # r = t rows are flow matching whatever alpha
    assert torch.equal(af.alpha_target(gen, z, t, t, v, None, 0.3), v)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_alpha_flow_point_oracle_loss_zero(alpha):
    obj = AlphaFlow(alpha_schedule="constant", alpha_start=alpha, ratio_r_neq_t=1.0, adaptive_p=0.0,
                    time_sampler={"kind": "uniform", "low": 0.05})
    out = obj.loss(PointOracle(X0), point_batch(), None)
    assert out.loss.abs().max() < 1e-20
    eps = torch.randn(16, 1, dtype=F64)
    assert torch.allclose(obj.sample(GaussianOracle(0.8, 0.5), eps, None, 1), 0.8 + 0.5 * eps, atol=1e-12)


def test_alpha_flow_sigmoid_curriculum_on_the_step_buffer():
    obj = AlphaFlow(alpha_steps=[0, 1000])
    values = [obj.alpha_at(k) for k in range(0, 1001, 50)]
    assert values[0] == 1.0 and values[-1] == 0.0 and obj.alpha_at(500) == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert min(v for v in values if v > 0) >= 5e-3                  # below the floor it is exactly 0
    gen = mlp_generator(obj)
    assert obj.current_alpha(gen) == 1.0
    for _ in range(500):
        obj.on_step_end(gen)
    assert int(gen.aux["alpha_flow_step"].step) == 500 and obj.current_alpha(gen) == pytest.approx(0.5)
    out = obj.loss(gen, torch.randn(8, 3, dtype=F64), None)
    assert out.metrics["alpha"] == pytest.approx(0.5) and torch.isfinite(out.loss).all()
    with pytest.raises(ValueError, match="alpha_flow_step"):
        obj.loss(PointOracle(X0), point_batch(), None)             # a net without the counter


# ---------------------------------------------------------------- improved MeanFlow
def test_imf_compound_velocity_is_the_marginal_velocity():
    """With the exact average velocity of Gaussian data and its own ``u(z, t, t)`` as the
    tangent, ``V = u + (t - r) du/dt`` is exactly the marginal velocity (the iMF target)."""
    torch.manual_seed(0)
    gauss = GaussianOracle(0.8, 0.5)
    obj = ImprovedMeanFlow()
    z = torch.randn(64, 1, dtype=F64)
    t = torch.rand(64, dtype=F64) * 0.9 + 0.05
    r = torch.where(torch.rand(64) < 0.5, t * torch.rand(64, dtype=F64), t)
    v_target, tangent, _ = obj.velocity_target_and_tangent(gauss, z, t, gauss.velocity(z, t), None)
    assert torch.allclose(tangent, gauss.velocity(z, t), atol=1e-12)
    V = obj.compound_velocity(gauss, z, r, t, tangent, None)
    assert torch.allclose(V, v_target, atol=1e-9)
    eps = torch.randn(16, 1, dtype=F64)
    assert torch.allclose(obj.sample(gauss, eps, None, 1), 0.8 + 0.5 * eps, atol=1e-12)


def test_imf_jvp_matches_finite_difference_and_point_loss_zero():
    torch.manual_seed(2)
    obj = ImprovedMeanFlow(v_loss_weight=1.0)
    gen = mlp_generator(obj)
    z, tangent = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    t = torch.rand(5, dtype=F64) * 0.8 + 0.1
    r = t * 0.4
    V = obj.compound_velocity(gen, z, r, t, tangent, None)
    dudt = (V - gen(z, t, t - r, None)) / (t - r)[:, None]
    assert torch.allclose(dudt, fd_dudt(gen, z, t, lambda s: s - r, tangent), rtol=1e-6, atol=1e-8)
    out = obj.loss(gen, torch.randn(8, 3, dtype=F64), None)
    out.loss.mean().backward()
    assert "mse_v" in out.metrics and gen.backbone.out.weight.grad.abs().sum() > 0
    point = ImprovedMeanFlow(v_loss_weight=1.0, time_sampler={"kind": "uniform", "low": 0.05})
    assert point.loss(PointOracle(X0), point_batch(), None).loss.abs().max() < 1e-20


# ---------------------------------------------------------------- all six: smoke + bad values
@pytest.mark.parametrize("name", NEW)
def test_each_trains_a_step_and_samples(name):
    torch.manual_seed(0)
    obj = OBJECTIVES[name]()
    gen = Generator(MLP((2,), width=16, depth=1, cond_dim=4), obj, ClassEmbedding(2, 4))
    out = gen.compute_loss({"x": torch.randn(16, 2), "cond": torch.tensor([0, 1] * 8)})
    assert out.loss.shape == (16,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()
    assert all(p.grad is not None for p in gen.backbone.parameters())
    obj.on_step_end(gen)
    steps = 1 if name == "regression" else 2
    sample = gen.generate(torch.tensor([0, 1, 1]), steps=steps)
    assert sample.shape == (3, 2) and torch.isfinite(sample).all()


@pytest.mark.parametrize("cls,kwargs,field", [
    (Regression, {"inference": {"steps": 4}}, "inference.steps"),
    (Regression, {"prediction": "velocity"}, "prediction"),
    (Shortcut, {"self_consistency_fraction": 1.0}, "self_consistency_fraction"),
    (Shortcut, {"min_step": 0.01}, "min_step"),
    (Shortcut, {"min_step": 1.0}, "min_step"),
    (Shortcut, {"target_decay": 1.0}, "target_decay"),
    (Shortcut, {"target_clip": 0.0}, "target_clip"),
    (Shortcut, {"class_drop_prob": 1.0}, "class_drop_prob"),
    (Shortcut, {"time_sampler": {"kind": "beta"}}, "time_sampler.kind"),
    (ConsistencyTraining, {"sigma_min": 0.0}, "sigma_min"),
    (ConsistencyTraining, {"sigma_max": 0.001}, "sigma_max"),
    (ConsistencyTraining, {"rho": -1.0}, "rho"),
    (ConsistencyTraining, {"s0": 0}, "s0"),
    (ConsistencyTraining, {"s1": 5}, "s1"),
    (ConsistencyTraining, {"curriculum_steps": 0}, "curriculum_steps"),
    (ConsistencyTraining, {"noise_std": 0.0}, "noise_std"),
    (ConsistencyTraining, {"huber_c": -0.1}, "huber_c"),
    (ContinuousConsistency, {"tangent_c": 0.0}, "tangent_c"),
    (ContinuousConsistency, {"adaptive_weight": "edm"}, "adaptive_weight"),
    (ContinuousConsistency, {"tangent_warmup_steps": -1}, "tangent_warmup_steps"),
    (ContinuousConsistency, {"time_sampler": {"std": 0}}, "time_sampler.std"),
    (AlphaFlow, {"alpha_schedule": "cosine"}, "alpha_schedule"),
    (AlphaFlow, {"alpha_start": 1.5}, "alpha_start"),
    (AlphaFlow, {"alpha_end": -0.1}, "alpha_end"),
    (AlphaFlow, {"alpha_steps": [100, 10]}, "alpha_steps"),
    (AlphaFlow, {"alpha_steps": [0]}, "alpha_steps"),
    (AlphaFlow, {"alpha_gamma": 0.0}, "alpha_gamma"),
    (AlphaFlow, {"alpha_clamp": 0.5}, "alpha_clamp"),
    (AlphaFlow, {"target_clip": -4.0}, "target_clip"),
    (AlphaFlow, {"ratio_r_neq_t": 2.0}, "ratio_r_neq_t"),
    (ImprovedMeanFlow, {"ratio_r_neq_t": -0.5}, "ratio_r_neq_t"),
    (ImprovedMeanFlow, {"adaptive_c": 0.0}, "adaptive_c"),
    (ImprovedMeanFlow, {"adaptive_p": -1.0}, "adaptive_p"),
    (ImprovedMeanFlow, {"v_loss_weight": -1.0}, "v_loss_weight"),
    (ImprovedMeanFlow, {"adaptive_reduce": "max"}, "adaptive_reduce"),
    (AlphaFlow, {"adaptive_reduce": "max"}, "adaptive_reduce"),
    (ImprovedMeanFlow, {"class_drop_prob": 1.0}, "class_drop_prob"),
])
def test_invalid_hyperparameters_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cls(**kwargs)


def test_curricula_longer_than_the_run_are_named_before_training():
    """``schedule_lengths`` names each step-driven curriculum by its config field; the trainer's
    warning fires exactly when the run is shorter (sCT's 10k-step tangent warm-up in a 2k-step
    run ends at 20%), and never for objectives without one."""
    from jumpflow.objectives import AlphaFlow, ConsistencyTraining, EasyConsistencyTraining, FlowMatching
    from jumpflow.trainer import short_schedule_warnings

    sct = ContinuousConsistency(tangent_warmup_steps=10_000)
    assert sct.schedule_lengths() == {"tangent_warmup_steps": 10_000}
    (line,) = short_schedule_warnings(sct, 2000)
    assert "objective.tangent_warmup_steps = 10000" in line and "trains 2000 steps" in line and "20%" in line
    assert short_schedule_warnings(sct, 10_000) == []
    assert ContinuousConsistency(tangent_warmup_steps=0).schedule_lengths() == {}
    assert AlphaFlow(alpha_steps=[0, 3000]).schedule_lengths() == {"alpha_steps": 3000}
    assert AlphaFlow(alpha_schedule="constant", alpha_start=0.5).schedule_lengths() == {}
    assert short_schedule_warnings(AlphaFlow(alpha_steps=[0, 3000]), 1000)[0].startswith(
        "warning: objective.alpha_steps = 3000")
    assert ConsistencyTraining(curriculum_steps=500).schedule_lengths() == {"curriculum_steps": 500}
    assert EasyConsistencyTraining(curriculum_steps=500).schedule_lengths() == {"curriculum_steps": 500}
    assert short_schedule_warnings(FlowMatching(), 1) == []
