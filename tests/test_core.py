"""Property tests of the shared core: time convention, objectives, drift field (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import GaussianOracle, PointOracle
from torch import nn

from jumpflow.backbones.mlp import MLP
from jumpflow.drift import drift_field, drift_field_numba, drift_field_torch
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import (
    DDPM,
    OBJECTIVES,
    Drifting,
    FlowMatching,
    MeanFlow,
    TerminalVelocityMatching,
    TimeSampler,
    TransitionMatching,
)
from jumpflow.objectives.base import Inference
from jumpflow.objectives.ddpm import squared_cosine_alphas_cumprod
from jumpflow.timeconv import interpolate, jump, velocity

torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------- time convention
def test_time_convention_pinned():
    x, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 5.0]])
    assert torch.equal(interpolate(x, eps, torch.tensor([0.0])), x)          # t = 0 is data
    assert torch.equal(interpolate(x, eps, torch.tensor([1.0])), eps)        # t = 1 is noise
    assert torch.equal(velocity(x, eps), eps - x)                           # v = dz/dt
    # one jump t = 1 -> r = 0 with the exact average velocity lands on data
    assert torch.allclose(jump(eps, torch.tensor([1.0]), torch.tensor([0.0]), eps - x), x)
    with pytest.raises(ValueError, match="time must have shape"):
        interpolate(x, eps, torch.tensor(0.5))


# ---------------------------------------------------------------- oracle nets
def test_meanflow_point_data_loss_zero_and_one_step_exact():
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    net = PointOracle(x0)
    obj = MeanFlow(ratio_r_neq_t=1.0, adaptive_p=0.0)
    x = x0.expand(64, 2).clone()
    out = obj.loss(net, x, None)
    assert out.loss.abs().max() < 1e-20
    eps = torch.randn(64, 2, dtype=torch.float64)
    assert torch.allclose(obj.sample(net, eps, None, 1), x, atol=1e-12)
    assert torch.allclose(obj.sample(net, eps, None, 3), x, atol=1e-12)


def test_meanflow_identity_on_gaussian():
    """With the marginal velocity, the closed-form average velocity satisfies the MeanFlow
    identity ``u = v - (t - r) du/dt`` exactly, and its one-step sample is ``m + s eps``."""
    torch.manual_seed(0)
    m, s = 0.8, 0.5
    net = GaussianOracle(m, s)
    obj = MeanFlow()
    b = 256
    t = torch.rand(b, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(b, dtype=torch.float64)
    z = torch.randn(b, 1, dtype=torch.float64)
    v = net.marginal_velocity(z, t)
    u, u_tgt = obj.prediction_and_target(net, z, r, t, v, None)
    assert torch.allclose(u, u_tgt, atol=1e-9)
    eps = torch.randn(b, 1, dtype=torch.float64)
    assert torch.allclose(obj.sample(net, eps, None, 1), m + s * eps, atol=1e-12)


def test_meanflow_wrong_tangent_breaks_identity():
    m, s = 0.8, 0.5
    net = GaussianOracle(m, s)
    t = torch.full((8,), 0.7, dtype=torch.float64)
    r = torch.full((8,), 0.2, dtype=torch.float64)
    z = torch.randn(8, 1, dtype=torch.float64)
    v = net.marginal_velocity(z, t)
    u, u_tgt = MeanFlow(tangent="v_0_0").prediction_and_target(net, z, r, t, v, None)
    assert (u - u_tgt).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["native", "data"])
def test_jvp_total_derivative_matches_finite_difference(prediction):
    """du/dt from the JVP equals central differences; with data prediction the division
    ``(z - x_hat) / t`` is differentiated too."""
    torch.manual_seed(0)
    obj = MeanFlow(prediction=prediction)
    net = Generator(MLP((3,), width=32, depth=2).double(), obj, shape=(3,))
    b = 5
    z = torch.randn(b, 3, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    r = t * 0.5
    v = torch.randn(b, 3, dtype=torch.float64)
    _u, u_tgt = obj.prediction_and_target(net, z, r, t, v, None)
    e = 1e-5

    def u_at(delta):
        return net(z + delta * v, t + delta, (t + delta) - r, None)
    dudt_fd = (u_at(e) - u_at(-e)) / (2 * e)
    dudt = (v - u_tgt) / (t - r)[:, None]
    assert torch.allclose(dudt, dudt_fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cond_dim", [0, 4])
def test_meanflow_jvp_only_on_rows_with_r_ne_t_equals_the_whole_batch_jvp(cond_dim):
    """The split (a plain forward on ``r = t`` rows, the JVP on the rest) gives the same ``u``,
    target and parameter gradient as one JVP over the whole batch, in float64, in the batch's
    own order; all-equal and all-different batches take one path each."""
    torch.manual_seed(0)
    obj = MeanFlow(jvp_rows="jump")
    net = Generator(MLP((3,), width=32, depth=2, cond_dim=cond_dim).double(), obj, shape=(3,))
    b = 12
    z, v = torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    r = torch.where(torch.arange(b) % 3 == 0, t * 0.4, t)              # rows 0, 3, 6, 9 jump
    cond = torch.randn(b, cond_dim, dtype=torch.float64) if cond_dim else None
    grads = []
    for fn in (obj.prediction_and_target, obj._jvp_prediction_and_target):
        net.zero_grad()
        u, tgt = fn(net, z, r, t, v, cond)
        (u * tgt).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        if fn == obj.prediction_and_target:
            split = (u.detach(), tgt)
    assert torch.allclose(split[0], u.detach(), atol=1e-12) and torch.allclose(split[1], tgt, atol=1e-12)
    assert torch.equal(split[1][r == t], v[r == t]) and not split[1].requires_grad
    assert torch.allclose(grads[0], grads[1], atol=1e-10)
    for rr in (t, t * 0.5):                                             # none / all rows jump
        u1, tgt1 = obj.prediction_and_target(net, z, rr, t, v, cond)
        u2, tgt2 = obj._jvp_prediction_and_target(net, z, rr, t, v, cond)
        assert torch.allclose(u1, u2, atol=1e-12) and torch.allclose(tgt1, tgt2, atol=1e-12)
    calls = []                                                          # jvp_rows="all": one call, one JVP
    hook = net.backbone.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    whole = MeanFlow(jvp_rows="all")
    u3, tgt3 = whole.prediction_and_target(net, z, r, t, v, cond)
    hook.remove()
    assert calls == [b] and torch.allclose(u3, split[0], atol=1e-12) and torch.allclose(tgt3, split[1], atol=1e-12)
    with pytest.raises(ValueError, match="jvp_rows"):
        MeanFlow(jvp_rows="some")


def test_meanflow_jvp_rows_auto_takes_one_call_on_a_small_batch_and_splits_a_large_one():
    """``jvp_rows="auto"`` (the default): one network call (the whole-batch JVP) while the batch holds
    at most ``JVP_ALL_MAX_ELEMENTS`` numbers, two calls (plain forward + JVP rows) above it."""
    from jumpflow.objectives.meanflow import JVP_ALL_MAX_ELEMENTS

    torch.manual_seed(0)
    assert MeanFlow().jvp_rows == "auto"
    obj = MeanFlow()
    net = Generator(MLP((8,), width=16, depth=1), obj, shape=(8,))
    calls = []
    net.backbone.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    for b, expected in ((JVP_ALL_MAX_ELEMENTS // 8, 1), (JVP_ALL_MAX_ELEMENTS // 8 + 4, 2)):
        calls.clear()
        z, v = torch.randn(b, 8), torch.randn(b, 8)
        t = torch.rand(b) * 0.8 + 0.1
        r = torch.where(torch.arange(b) % 4 == 0, t * 0.5, t)
        obj.prediction_and_target(net, z, r, t, v, None)
        assert len(calls) == expected and sum(calls) == b


def test_flow_matching_point_oracle_exact_in_one_euler_step():
    x0 = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    net, obj = PointOracle(x0), FlowMatching(inference={"sampler": "heun"})
    x = x0.expand(16, 2).clone()
    assert obj.loss(net, x, None).loss.abs().max() < 1e-20
    eps = torch.randn(16, 2, dtype=torch.float64)
    assert torch.allclose(FlowMatching().sample(net, eps, None, 1), x, atol=1e-12)


def test_tvm_point_oracle_loss_zero():
    x0 = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    obj = TerminalVelocityMatching()
    out = obj.loss(PointOracle(x0), x0.expand(32, 2).clone(), None)
    assert out.loss.abs().max() < 1e-20


def test_tvm_gradient_flows_through_jvp():
    torch.manual_seed(0)
    net = Generator(MLP((2,), 32, 2), TerminalVelocityMatching(lambda_fm=0.0))
    out = net.compute_loss({"x": torch.randn(8, 2)})
    out.loss.mean().backward()
    grads = [p.grad for p in net.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in net.aux["tvm_target"].parameters())


def test_ddim_100_matches_probability_flow_on_gaussian():
    """Exact epsilon for data N(m, s^2): DDIM with 100 steps maps noise through the
    deterministic (probability-flow) limit, which for a Gaussian keeps the normalised
    coordinate; DDPM with the same net matches the moments."""
    torch.manual_seed(0)
    m, s = 0.5, 0.3
    obj = DDPM(num_train_steps=100, inference={"sampler": "ddim"}, clip_sample=None)
    abar = obj.alphas_cumprod

    class EpsOracle(nn.Module):
        def forward(self, x, t, h, cond):
            k = torch.round(t * 100 - 1).long()
            a = abar[k].to(x.dtype)[:, None]
            var = a * s ** 2 + 1 - a
            return (1 - a).sqrt() * (x - a.sqrt() * m) / var

    noise = torch.randn(4000, 1, dtype=torch.float64)
    x = obj.sample(EpsOracle(), noise, None, 100)
    a_last = abar[-1]
    n = (noise - a_last.sqrt() * m) / torch.sqrt(a_last * s ** 2 + 1 - a_last)
    err_100 = (x - (m + s * n)).abs()
    assert err_100.max() < 0.05 and err_100.mean() < 0.01
    err_50 = (obj.sample(EpsOracle(), noise, None, 50) - (m + s * n)).abs()
    assert err_100.max() < 0.7 * err_50.max()      # converges to the deterministic limit
    x_ddpm = obj.sample(EpsOracle(), noise, None, Inference(steps=100, sampler="ddpm"))
    assert abs(x_ddpm.mean().item() - m) < 0.03 and abs(x_ddpm.std().item() - s) < 0.03
    # one DDPM step from pure noise gives the posterior mean only: far too narrow
    x1 = obj.sample(EpsOracle(), noise, None, Inference(steps=1, sampler="ddpm"))
    assert x1.std().item() < 0.5 * s


def test_squared_cosine_schedule():
    a = squared_cosine_alphas_cumprod(100)
    assert a.shape == (100,) and a.dtype == torch.float64
    assert torch.all(a[1:] < a[:-1]) and 0.99 < a[0] < 1 and a[-1] < 1e-3


# ---------------------------------------------------------------- drift field
def _drift_case(seed=0, groups=4, g=6, p=5, u=3, d=4):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return mk(groups, g, d), mk(groups, p, d), mk(groups, u, d), torch.rand(groups, p, generator=gen) > 0.3


@pytest.mark.parametrize("attraction_only", [False, True])
def test_drift_numba_equals_torch(attraction_only):
    gen, pos, neg, mask = _drift_case()
    mask[:, 0] = True
    a = drift_field_torch(gen, pos, mask, neg, 0.7, (0.02, 0.05, 0.2), True, attraction_only)
    b = drift_field_numba(gen, pos, mask, neg, 0.7, (0.02, 0.05, 0.2), True, attraction_only)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert torch.allclose(drift_field(gen, pos, mask, neg, impl="torch"), drift_field(gen, pos, mask, neg, impl="numba"),
                          atol=1e-6)


def test_drift_antisymmetric_and_zero_at_equilibrium():
    gen, pos, neg, _ = _drift_case(1, p=5, u=5)
    for impl in ("torch", "numba"):
        v_pq = drift_field(gen, pos, neg=neg, gen_as_neg=False, impl=impl, normalize=False)
        v_qp = drift_field(gen, neg, neg=pos, gen_as_neg=False, impl=impl, normalize=False)
        assert torch.allclose(v_pq, -v_qp, atol=1e-12)
        v_pp = drift_field(gen, pos, neg=pos.clone(), gen_as_neg=False, impl=impl, normalize=False)
        assert v_pp.abs().max() < 1e-12
        assert v_pq.abs().max() > 1e-3


def test_drift_attracts_towards_positives():
    gen = torch.zeros(1, 4, 2, dtype=torch.float64) + torch.randn(1, 4, 2, dtype=torch.float64) * 0.01
    pos = torch.tensor([[[3.0, 0.0]]], dtype=torch.float64)
    v = drift_field(gen, pos)
    assert (v[..., 0] > 0).all()


def test_drift_rejects_bad_input():
    gen, pos, _neg, _ = _drift_case()
    with pytest.raises(ValueError, match="temperatures"):
        drift_field(gen, pos, temperatures=())
    with pytest.raises(ValueError, match="disagree"):
        drift_field(gen, pos[:, :, :2])
    with pytest.raises(ValueError, match="impl"):
        drift_field(gen, pos, impl="cuda-magic")


def test_drifting_groups_by_condition():
    obj = Drifting(gen_per_group=3, group_by="cond")
    x = torch.arange(10, dtype=torch.float32)[:, None]
    cond = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 2, 1])[:, None].float()
    pos, mask, group_cond = obj._groups(x, cond)
    assert pos.shape == (3, 4, 1) and mask.sum() == 10
    for gi in range(3):
        members = x[(cond[:, 0] == group_cond[gi, 0])].flatten().sort().values
        assert torch.equal(pos[gi][mask[gi]].flatten().sort().values, members)


def test_drifting_feature_blocks_each_get_their_own_field():
    """A feature map returning ``[x, x]`` gives exactly twice the one-block loss (each block
    normalised on its own), and its gradient is twice the one-block gradient."""
    class Blocks(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return [x] * self.n if self.n > 1 else x

    losses, grads = [], []
    for n in (1, 2):
        torch.manual_seed(0)
        gen = Generator(MLP((3,), 16, 1).double(), Drifting(gen_per_group=4, kernel="torch", group_by="sample",
                                                             feature_map=lambda n=n: Blocks(n)), shape=(3,))
        torch.manual_seed(1)
        out = gen.compute_loss({"x": torch.randn(5, 3, dtype=torch.float64),
                                "cond": torch.randn(5, 2, dtype=torch.float64)})
        out.loss.sum().backward()
        losses.append(out.loss.detach())
        grads.append(gen.backbone.out.weight.grad.clone())
    assert torch.allclose(losses[1], 2 * losses[0], rtol=1e-12)
    assert torch.allclose(grads[1], 2 * grads[0], rtol=1e-10)


# ---------------------------------------------------------------- every objective
def _tiny_generator(name, **kw):
    torch.manual_seed(0)
    obj = OBJECTIVES[name](**kw)
    return Generator(MLP((2,), width=64, depth=2, cond_dim=8), obj, ClassEmbedding(2, 8))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_lowers_its_loss(name):
    """Each objective, trained on a fixed two-point class-conditional problem, lowers its loss."""
    kw = {"gen_per_group": 8} if name == "drifting" else {}
    if name.startswith("transition_matching"):
        kw = {"head_width": 64, "head_depth": 2}      # the default head (256 x 3) is 5x the backbone here
    net = _tiny_generator(name, **kw)
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).repeat(16, 1)
    cond = torch.tensor([0, 1]).repeat(16)
    # Transition Matching learns a head on top of the backbone and needs the longer schedule;
    # the consistency losses compare with a moving target and fall more slowly
    steps, lr = (150, 3e-3) if name.startswith("transition_matching") else (100, 1e-2) if name in ("consistency", "ect") else (50, 1e-2)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def eval_loss():
        torch.manual_seed(123)
        if name == "drifting":
            # Drifting's loss is the rms-normalised ||V||^2, constant by construction; what
            # falls is the distance of its one-step samples to their class's data point.
            labels = torch.tensor([0, 1]).repeat(32)
            return (net.generate(labels, steps=1) - x[:2][labels]).norm(dim=1).mean().item()
        with torch.no_grad() if not net.objective.uses_jvp else torch.enable_grad():
            out = net.compute_loss({"x": x, "cond": cond})
            # the MeanFlow family's adaptive weight saturates its loss (near 1 / D with the summed
            # ||err||^2): judge the raw error
            adaptive = name in ("meanflow", "alpha_flow", "improved_meanflow")
            return out.metrics["mse"] if adaptive else out.loss.mean().item()
    before = eval_loss()
    for _ in range(steps):
        loss = net.compute_loss({"x": x, "cond": cond}).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.objective.on_step_end(net)
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
    steps = 1 if name == "drifting" else net.objective.inference.steps
    sample = net.generate(torch.tensor([0, 1] * 32), steps=steps)
    assert sample.shape == (64, 2) and torch.isfinite(sample).all()


@pytest.mark.parametrize("cls,kwargs,field", [
    (MeanFlow, {"ratio_r_neq_t": -0.1}, "ratio_r_neq_t"),
    (MeanFlow, {"tangent": "v_2_1"}, "tangent"),
    (MeanFlow, {"adaptive_c": 0.0}, "adaptive_c"),
    (MeanFlow, {"guidance_interval": (0.8, 0.2)}, "guidance_interval"),
    (MeanFlow, {"time_sampler": {"kind": "beta"}}, "time_sampler.kind"),
    (MeanFlow, {"time_sampler": {"std": -1}}, "time_sampler.std"),
    (MeanFlow, {"class_drop_prob": 1.5}, "class_drop_prob"),
    (MeanFlow, {"kappa": 1.0}, "kappa"),
    (MeanFlow, {"omega": 0.0}, "omega"),
    (FlowMatching, {"inference": {"sampler": "rk45"}}, "inference.sampler"),
    (MeanFlow, {"inference": {"guidance": 2.0}}, "inference.guidance"),
    (MeanFlow, {"inference": {"steps": 0}}, "inference.steps"),
    (FlowMatching, {"class_drop_prob": -0.2}, "class_drop_prob"),
    (TerminalVelocityMatching, {"target_decay": 1.0}, "target_decay"),
    (TerminalVelocityMatching, {"lambda_fm": -1.0}, "lambda_fm"),
    (TransitionMatching, {"transition_steps": 0}, "transition_steps"),
    (TransitionMatching, {"inner_steps": 0}, "inner_steps"),
    (TransitionMatching, {"head_samples": 0}, "head_samples"),
    (Drifting, {"temperatures": []}, "temperatures"),
    (Drifting, {"temperatures": [0.1, -0.2]}, "temperatures"),
    (Drifting, {"gen_per_group": 0}, "gen_per_group"),
    (Drifting, {"group_by": "batch"}, "group_by"),
    (Drifting, {"n_uncond_neg": -1}, "n_uncond_neg"),
    (DDPM, {"num_train_steps": 0}, "num_train_steps"),
    (DDPM, {"inference": {"sampler": "euler"}}, "inference.sampler"),
])
def test_invalid_hyperparameters_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["flow_matching", "ddpm", "transition_matching"])
def test_steps_below_one_raise(name):
    net = _tiny_generator(name)
    with pytest.raises(ValueError, match="steps"):
        net.objective.sample(net, torch.randn(2, 2), net.encode(torch.tensor([0, 1])), 0)


def test_time_sampler_logit_normal_moments():
    torch.manual_seed(0)
    t = TimeSampler("logit_normal", mean=-0.4, std=1.0)(200_000)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.4) < 0.01 and abs(logit.std().item() - 1.0) < 0.01


def test_meanflow_ratio_of_r_neq_t():
    torch.manual_seed(0)
    t, r = MeanFlow(ratio_r_neq_t=0.25).sample_times(100_000, "cpu", torch.float32)
    assert torch.all(t >= r)
    assert abs((t != r).float().mean().item() - 0.25) < 0.01


def test_class_drop_needs_null_condition():
    obj = FlowMatching(class_drop_prob=0.5)
    net = Generator(MLP((2,), 16, 1, cond_dim=3), obj, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="null"):
        net.compute_loss({"x": torch.randn(4, 2), "cond": torch.randn(4, 3)})


def test_nan_in_batch_is_rejected():
    net = _tiny_generator("flow_matching")
    with pytest.raises(ValueError, match="NaN"):
        net.compute_loss({"x": torch.tensor([[math.nan, 0.0]]), "cond": torch.tensor([0])})


def test_drift_kernels_stay_finite_with_far_outliers():
    """Rows whose kernel underflows at small temperature must give zero, not NaN."""
    gen = torch.randn(2, 8, 2)
    gen[:, 0] += 500.0
    pos = torch.randn(2, 16, 2) * 0.01
    for impl in ("numba", "torch"):
        v = drift_field(gen, pos, impl=impl)
        assert torch.isfinite(v).all()
    assert torch.allclose(drift_field(gen, pos, impl="numba"), drift_field(gen, pos, impl="torch"), atol=1e-4)


def test_toy_metrics_closed_form():
    from jumpflow.eval.toy_metrics import mmd_rbf, sliced_w2

    x = torch.randn(2000, 2, dtype=torch.float64)
    assert sliced_w2(x, x.clone()) == 0.0
    shift = torch.tensor([3.0, 4.0], dtype=torch.float64)
    # SW2^2 of a translation by a is E_theta (theta . a)^2 = |a|^2 / d
    assert abs(sliced_w2(x, x + shift, n_projections=4096) - 5.0 / math.sqrt(2)) < 0.1
    assert abs(mmd_rbf(x[:1000], x[1000:])) < 0.01 < mmd_rbf(x[:1000], x[1000:] + 1.0)


def test_backward_through_jvp_of_mlp_matches_finite_difference():
    """TVM backpropagates through dF/ds; the MLP must give the right gradient there
    (torch's fused layer_norm does not: pytorch/pytorch#196700)."""
    torch.manual_seed(0)
    net = MLP((3,), width=16, depth=2).double()
    with torch.no_grad():                      # leave the zero-initialised output layers
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 0.8, dtype=torch.float64)
    s = torch.full((4,), 0.3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)

    def objective():
        _, dF = torch.func.jvp(lambda s_: net(z, t, t - s_, None), (s,), (torch.ones_like(s),))
        return (dF * w).sum()
    net.zero_grad()
    objective().backward()
    e = 1e-6
    checked = 0
    for name, param in net.named_parameters():
        if param.grad is None:                 # does not reach dF/ds (e.g. t's embedding bias path)
            continue
        checked += 1
        grad = param.grad.flatten()[0].item()
        with torch.no_grad():
            param.view(-1)[0] += e
        up = objective().item()
        with torch.no_grad():
            param.view(-1)[0] -= 2 * e
        down = objective().item()
        with torch.no_grad():
            param.view(-1)[0] += e
        assert abs(grad - (up - down) / (2 * e)) < 1e-6 * max(1.0, abs(grad)), name
    assert checked > 20


class TransitionPointOracle(nn.Module):
    """Transition Matching on the single point ``x0``: the backbone's features of a token are
    ``(z_t, t)`` and the head's inner velocity is exact, because ``Y = x0 - eps = (x0 - z_t) / t``
    is a function of ``z_t``: the inner path ``Y_sigma = (1 - sigma) Y + sigma eta`` has velocity
    ``eta - Y = (Y_sigma - Y) / sigma``."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.aux = {"transition_head": self.head}

    def tokenize(self, x):
        return x.reshape(x.shape[0], 1, -1)                                  # (B, 1, D)

    def untokenize(self, tokens):
        return tokens.reshape(tokens.shape[0], -1)                           # (B, D)

    def forward(self, z, t, h, cond, return_features=False):
        feats = torch.cat([self.tokenize(z), t[:, None, None]], dim=-1)      # (B, 1, D + 1)
        return z, feats

    def head(self, feats, y_sigma, sigma):
        z, t = feats[..., :-1], feats[..., -1:]
        y = (self.tokenize(self.x0.expand(z.shape[0], -1)) - z) / t          # (B', 1, D)
        return (y_sigma - y) / sigma[..., None]


def test_transition_matching_point_oracle_loss_zero_and_sampling_exact():
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    net = TransitionPointOracle(x0)
    obj = TransitionMatching(transition_steps=4, inner_steps=3, train_times="continuous")
    torch.manual_seed(0)
    out = obj.loss(net, x0.expand(64, 2).clone(), None)
    assert out.loss.abs().max() < 1e-10
    for steps in (1, 2, 4):
        sample = obj.sample(net, torch.randn(16, 2, dtype=torch.float64), None, steps)
        assert torch.allclose(sample, x0.expand(16, 2), atol=1e-10), steps


@pytest.mark.parametrize("env_layer,expected", [(None, "workqueue"), ("omp", "omp")])
def test_drift_kernel_threading_layer(env_layer, expected):
    """The numba drift kernel runs on the workqueue layer (its workers sleep between launches;
    numba's OpenMP pool spun beside torch's), unless the user names a layer."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if env_layer:
        env["NUMBA_THREADING_LAYER"] = env_layer
    code = ("import numba, torch\n"
            "from jumpflow.drift import drift_field_numba\n"
            "g = torch.randn(2, 4, 3, dtype=torch.float64)\n"
            "drift_field_numba(g, torch.randn(2, 3, 3, dtype=torch.float64), temperatures=(0.1,))\n"
            "print(numba.threading_layer())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
