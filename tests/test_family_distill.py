"""The rest of the one-step family: distillation from a frozen teacher (consistency distillation,
Align Your Flow's Eulerian map distillation), ECT, and autoregressive Transition Matching.
Closed-form answers in float64; teachers from real checkpoints where the checkpoint is the point."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from oracles import GaussianOracle, PointOracle, registered_objective_from_config
from safetensors.torch import load_file
from torch import nn

from jumpflow.backbones.mlp import MLP
from jumpflow.checkpoint import load_model, resolve_checkpoint
from jumpflow.config import ConfigError
from jumpflow.generator import Generator
from jumpflow.objectives import (
    DDPM,
    AlignYourFlow,
    AutoregressiveTransitionMatching,
    ConsistencyDistillation,
    EasyConsistencyTraining,
    MeanFlow,
)
from jumpflow.objectives.artm import CausalContext
from jumpflow.objectives.consistency import consistency_function
from jumpflow.objectives.curriculum import halvings
from jumpflow.objectives.teacher import FrozenCheckpoint, flow_grid, teacher_step
from jumpflow.trainer import train

F64 = torch.float64
NEW = ("ect", "distill_consistency", "distill_ayf", "transition_matching_ar")
X0 = torch.tensor([[0.7, -0.3]], dtype=F64)          # inside [-1, 1]: a DDPM teacher's clipping is inactive
M, S = 0.8, 0.5                                       # Gaussian data N(M, S^2 I)


def with_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """An oracle student whose ``aux`` holds an in-memory teacher."""
    student.aux = {"distill_teacher": FrozenCheckpoint.of(teacher)}
    return student


def gaussian_batch(n=256, dim=2, seed=0):
    return M + S * torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registry, configs, bad values
def test_registered_and_configs_instantiate():
    built = {name: registered_objective_from_config(name, max_steps=1234) for name in NEW}
    assert built["transition_matching_ar"].inference.steps == 4        # T backbone passes
    assert built["ect"].curriculum_steps == 1234                       # ECT's stages span the run


@pytest.mark.parametrize("cls,kwargs,field", [
    (ConsistencyDistillation, {"teacher": ""}, "teacher"),
    (ConsistencyDistillation, {"teacher": 3}, "teacher"),
    (ConsistencyDistillation, {"teacher_levels": 0}, "teacher_levels"),
    (ConsistencyDistillation, {"teacher_levels": True}, "teacher_levels"),
    (ConsistencyDistillation, {"teacher_ema": "yes"}, "teacher_ema"),
    (ConsistencyDistillation, {"init_student": 1}, "init_student"),
    (ConsistencyDistillation, {"num_steps": 0}, "num_steps"),
    (ConsistencyDistillation, {"rho": 0.0}, "rho"),
    (ConsistencyDistillation, {"solver": "rk4"}, "solver"),
    (ConsistencyDistillation, {"target_decay": 1.0}, "target_decay"),
    (ConsistencyDistillation, {"distance": "lpips"}, "distance"),
    (ConsistencyDistillation, {"huber_c": 0.0}, "huber_c"),
    (ConsistencyDistillation, {"weighting": "snr"}, "weighting"),
    (ConsistencyDistillation, {"inference": {"steps": 0}}, "inference.steps"),
    (AlignYourFlow, {"teacher": " "}, "teacher"),
    (AlignYourFlow, {"ratio_r_neq_t": 1.5}, "ratio_r_neq_t"),
    (AlignYourFlow, {"tangent_c": -1.0}, "tangent_c"),
    (AlignYourFlow, {"tangent_warmup_steps": -1}, "tangent_warmup_steps"),
    (AlignYourFlow, {"adaptive_c": 0.0}, "adaptive_c"),
    (AlignYourFlow, {"time_sampler": {"kind": "beta"}}, "time_sampler.kind"),
    (EasyConsistencyTraining, {"q": 1.0}, "q"),
    (EasyConsistencyTraining, {"k": -1.0}, "k"),
    (EasyConsistencyTraining, {"b": 0.0}, "b"),
    (EasyConsistencyTraining, {"stages": 0}, "stages"),
    (EasyConsistencyTraining, {"curriculum_steps": 0}, "curriculum_steps"),
    (EasyConsistencyTraining, {"sigma_max": 0.001}, "sigma_max"),
    (EasyConsistencyTraining, {"noise_std": 0.0}, "noise_std"),
    (EasyConsistencyTraining, {"weighting": "snr"}, "weighting"),
    (EasyConsistencyTraining, {"init_from": ""}, "init_from"),
    (EasyConsistencyTraining, {"huber_c": -1.0}, "huber_c"),
    (AutoregressiveTransitionMatching, {"transition_steps": 0}, "transition_steps"),
    (AutoregressiveTransitionMatching, {"inner_steps": 0}, "inner_steps"),
    (AutoregressiveTransitionMatching, {"head_samples": 0}, "head_samples"),
    (AutoregressiveTransitionMatching, {"class_drop_prob": 1.0}, "class_drop_prob"),
])
def test_invalid_hyperparameters_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        cls(**kwargs)
    assert isinstance(err.value, ConfigError) and err.value.key == field


# ---------------------------------------------------------------- consistency distillation
@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_cd_loss_zero_at_the_oracle_on_a_point(solver, distance):
    """Point data: every ODE path is straight, so one teacher step is exact and the oracle's
    consistency function (``f = x0``) is a zero of the loss on any grid."""
    obj = ConsistencyDistillation(num_steps=7, rho=2.0, solver=solver, distance=distance, huber_c=1e-3)
    student = with_teacher(PointOracle(X0), PointOracle(X0))
    torch.manual_seed(0)
    out = obj.loss(student, X0.expand(64, 2).clone(), None)
    assert out.loss.abs().max() < 1e-12


@pytest.mark.parametrize("solver,order", [("euler", 2), ("heun", 3)])
def test_teacher_step_local_error_has_the_solver_order(solver, order):
    """Gaussian data, exact teacher: ``f(Phi(z_t; t -> r), r) - f(z_t, t)`` with the exact flow map ``f``
    is the solver's local error, ``O(dt^order)``: halving ``dt`` divides the mean squared
    difference (the CD loss at the oracle) by ``2^(2 order)``. (The step to ``r = 0`` is Euler for
    both, as in EDM's sampler; it is left out here.)"""
    oracle = GaussianOracle(M, S)
    slot = FrozenCheckpoint.of(oracle)
    x, eps = gaussian_batch(512), torch.randn(512, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def oracle_loss(n):
        grid, total = flow_grid(n, 1.0), 0.0
        for i in range(1, n):
            t, r = grid[i + 1].expand(512), grid[i].expand(512)
            z = (1 - t[:, None]) * x + t[:, None] * eps
            z_r = teacher_step(slot, z, t, r, None, solver)
            total += (oracle.flow(z_r, r, torch.zeros_like(r)) - oracle.flow(z, t, torch.zeros_like(t))).pow(2).mean()
        return total / n
    ratio = oracle_loss(32) / oracle_loss(64)
    assert 0.75 * 4 ** order < ratio < 1.25 * 4 ** order, ratio
    obj = ConsistencyDistillation(num_steps=64, solver=solver)
    torch.manual_seed(0)
    assert obj.loss(with_teacher(GaussianOracle(M, S), oracle), gaussian_batch(256), None).loss.mean() < 1e-6


class TableStudent(nn.Module):
    """A consistency function that is affine per grid level, ``f(z, t_n) = a_n z + c_n``, returned as
    the average velocity ``u = (z - f) / t`` the objective expects."""

    def __init__(self, grid, dim):
        super().__init__()
        self.grid = grid
        self.a = nn.Parameter(torch.ones(len(grid), dim, dtype=F64))
        self.c = nn.Parameter(torch.zeros(len(grid), dim, dtype=F64))

    def forward(self, z, t, h, cond=None):
        n = (t[:, None] - self.grid[None]).abs().argmin(1)
        return (z - (self.a[n] * z + self.c[n])) / t.clamp_min(1e-12)[:, None]


def test_distilled_student_reproduces_the_teachers_ode_map_at_one_step():
    """Train a student (affine per level, which can represent the answer) by consistency distillation
    of the exact Gaussian velocity: its 1-step map ``f(z, 1)`` is the teacher's N-step Heun solution,
    hence (up to Heun's error) the exact flow map ``z -> m + s z`` of the data."""
    torch.manual_seed(0)
    oracle = GaussianOracle(M, S)
    obj = ConsistencyDistillation(num_steps=6, rho=1.5)
    student = with_teacher(TableStudent(obj.grid(None), 2), oracle)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    for _ in range(1500):
        loss = obj.loss(student, gaussian_batch(256, seed=torch.randint(0, 10**6, ()).item()), None).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(500, 2, dtype=F64)
    one_step = obj.sample(student, z, None, 1)
    heun = z.clone()                                                        # the teacher's 6-step ODE solution
    grid = obj.grid(None)
    for i in range(len(grid) - 1, 0, -1):
        heun = teacher_step(FrozenCheckpoint.of(oracle), heun, grid[i].expand(500), grid[i - 1].expand(500), None, "heun")
    assert (one_step - heun).abs().max() < 2e-3
    assert (one_step - (M + S * z)).abs().max() < 2e-2                      # the exact map at t = 1


def test_cd_without_teacher_is_consistency_training():
    """``teacher: null``: the teacher's step becomes the exact step of ``v = eps - x``, i.e. the
    pair of consistency training on the same noise."""
    obj = ConsistencyDistillation(num_steps=5)
    torch.manual_seed(3)
    gen = Generator(MLP((2,), width=16, depth=1), obj, shape=(2,)).double()
    x = gaussian_batch(32)
    torch.manual_seed(3)
    out = obj.loss(gen, x, None)
    torch.manual_seed(3)
    n = torch.randint(0, 5, (32,))
    grid = flow_grid(5, 1.0)
    t, r = grid[n + 1].to(F64), grid[n].to(F64)
    eps = torch.randn_like(x)
    z_t, z_r = (1 - t[:, None]) * x + t[:, None] * eps, (1 - r[:, None]) * x + r[:, None] * eps
    ref = (consistency_function(gen, z_t, t, None) - consistency_function(gen, z_r, r, None)).pow(2).mean(1)
    assert torch.allclose(out.loss, ref, rtol=1e-12, atol=1e-15)


class DDPMPointOracle(nn.Module):
    """An exact epsilon network of DDPM on the point ``x0``: ``eps = (x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k)``."""

    def __init__(self, x0, dp_exact=False):
        super().__init__()
        self.x0, self.objective = x0, DDPM(num_train_steps=20, dp_exact=dp_exact)

    def forward(self, x_k, t, h, cond=None):
        abar = self.objective.alphas_cumprod[self.objective.train_index(t)].to(x_k.dtype)[:, None]
        return (x_k - abar.sqrt() * self.x0) / (1 - abar).sqrt()


@pytest.mark.parametrize("dp_exact", [False, True])
def test_ddpm_teacher_is_the_flow_velocity_on_its_levels(dp_exact):
    """The DDPM -> flow conversion: on each level ``t_k`` the exact epsilon network gives the exact
    flow velocity ``(z - x0) / t_k``; CD with that teacher is zero at the point oracle, its grid is
    ``{0} + levels`` and AYF moves ``t`` onto the levels."""
    slot = FrozenCheckpoint.of(DDPMPointOracle(X0, dp_exact))
    levels = slot.grid
    assert levels.shape == (20,) and levels[-1] == 1 and (levels.diff() > 0).all()
    z = torch.randn(20, 2, dtype=F64)
    assert torch.allclose(slot.velocity(z, levels, None), (z - X0) / levels[:, None], rtol=1e-9, atol=1e-9)
    obj = ConsistencyDistillation()
    assert torch.equal(obj.grid(slot), torch.cat([torch.zeros(1, dtype=F64), levels]))
    torch.manual_seed(0)
    student = with_teacher(PointOracle(X0), DDPMPointOracle(X0, dp_exact))
    assert obj.loss(student, X0.expand(64, 2).clone(), None).loss.abs().max() < 1e-12
    assert torch.equal(slot.snap(torch.tensor([0.999999, 0.0001], dtype=F64)), levels[[-1, 0]])


@pytest.mark.parametrize("n_levels", [1, 3, 7, 20])
def test_cd_on_a_subgrid_of_ddpm_levels_takes_exact_ddim_jumps(n_levels):
    """``teacher_levels = N``: the grid is ``{0} + N`` of the teacher's levels in DDIM's trailing
    spacing (the noisiest always in), each interval one DDIM jump over several levels, which is
    exact on point data, so the oracle is a zero of the loss; ``N = K`` is the full grid."""
    slot = FrozenCheckpoint.of(DDPMPointOracle(X0))
    levels = slot.grid
    grid = ConsistencyDistillation(teacher_levels=n_levels).grid(slot)
    assert grid.shape == (n_levels + 1,) and grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert all((levels == g).any() for g in grid[1:])                 # every point is a level
    gaps = (levels[:, None] == grid[None, 1:]).nonzero()[:, 0].diff()  # levels jumped per interval
    assert n_levels == 1 or (gaps.max() - gaps.min()) <= 1            # evenly spread
    if n_levels == 20:
        assert torch.equal(grid, ConsistencyDistillation().grid(slot))
    for solver in ("euler", "heun"):
        obj = ConsistencyDistillation(teacher_levels=n_levels, solver=solver)
        torch.manual_seed(0)
        student = with_teacher(PointOracle(X0), DDPMPointOracle(X0))
        out = obj.loss(student, X0.expand(64, 2).clone(), None)
        assert out.loss.abs().max() < 1e-12 and out.metrics["intervals"] == n_levels
    # the same jump on Gaussian data is DDIM's update: x0_hat and eps_hat carried to the next level
    t, r = grid[-1:].expand(4), grid[-2:-1].expand(4)
    z = torch.randn(4, 2, dtype=F64)
    v = slot.velocity(z, t, None)
    x0_hat, eps_hat = z - t[:, None] * v, z + (1 - t[:, None]) * v
    ddim = (1 - r[:, None]) * x0_hat + r[:, None] * eps_hat
    assert torch.allclose(teacher_step(slot, z, t, r, None, "euler"), ddim, atol=1e-12)


# ---------------------------------------------------------------- Align Your Flow (EMD)
def test_ayf_jvp_equals_a_finite_difference():
    """``du/dt`` along ``(v, 1)`` with ``r`` fixed (``h = t - r`` moves with ``t``) equals the central
    difference of ``delta -> u(z + delta v, t + delta, h = t + delta - r)``."""
    torch.manual_seed(0)
    gen = Generator(MLP((3,), width=32, depth=2), AlignYourFlow(), shape=(3,)).double()
    with torch.no_grad():
        for p in gen.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    z, v = torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)
    t = torch.rand(6, dtype=F64) * 0.8 + 0.15
    r = t * torch.rand(6, dtype=F64)
    u, dudt = gen.objective.flow_map_tangent(gen, z, t, r, v, None)
    e = 1e-5
    fd = (gen(z + e * v, t + e, t + e - r, None) - gen(z - e * v, t - e, t - e - r, None)) / (2 * e)
    assert torch.allclose(u, gen(z, t, t - r, None))
    assert torch.allclose(dudt, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("oracle", [PointOracle(X0), GaussianOracle(M, S)], ids=["point", "gaussian"])
def test_ayf_loss_zero_at_the_teachers_flow_map(oracle):
    """The exact flow map of the exact teacher has ``df/dt = 0`` along the teacher's ODE: the EMD loss
    is zero for every ``(t, r)``, with or without tangent normalisation."""
    data = X0.expand(128, 2).clone() if isinstance(oracle, PointOracle) else gaussian_batch(128)
    for kw in ({}, {"tangent_c": 0.1, "adaptive_p": 0.0}):
        obj = AlignYourFlow(time_sampler={"kind": "uniform", "low": 0.05}, **kw)
        torch.manual_seed(0)
        out = obj.loss(with_teacher(type(oracle)(*((X0,) if isinstance(oracle, PointOracle) else (M, S))), oracle),
                       data, None)
        assert out.loss.abs().max() < 1e-20 and out.metrics["frac_r_neq_t"] > 0.5


def test_ayf_without_teacher_is_meanflow():
    """With the single-sample velocity in the teacher's place the EMD surrogate is MeanFlow's loss."""
    torch.manual_seed(0)
    gen = Generator(MLP((2,), width=16, depth=1), MeanFlow(), shape=(2,)).double()
    x = gaussian_batch(16)
    kw = {"ratio_r_neq_t": 0.6, "adaptive_p": 0.5}
    torch.manual_seed(5)
    mf = MeanFlow(**kw).loss(gen, x, None).loss
    torch.manual_seed(5)
    ayf = AlignYourFlow(**kw).loss(gen, x, None).loss
    assert torch.allclose(mf, ayf, rtol=1e-12, atol=1e-15)


def test_ayf_at_r_equal_t_distils_the_teachers_velocity():
    """``r = t`` rows: the target is the teacher's velocity, so the surrogate is flow matching on it."""
    oracle = GaussianOracle(M, S)
    obj = AlignYourFlow(ratio_r_neq_t=0.0, adaptive_p=0.0)
    torch.manual_seed(0)
    gen = Generator(MLP((2,), width=16, depth=1), obj, shape=(2,)).double()
    gen.aux["distill_teacher"] = FrozenCheckpoint.of(oracle)
    x = gaussian_batch(32)
    torch.manual_seed(7)
    out = obj.loss(gen, x, None).loss
    torch.manual_seed(7)
    eps = torch.randn_like(x)
    t, _ = obj.sample_times(32, x.device, x.dtype)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    ref = (gen(z, t, torch.zeros_like(t), None) - oracle.velocity(z, t)).pow(2).mean(1)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- ECT
def test_ect_schedule_shrinks_dt_with_the_step_counter():
    obj = EasyConsistencyTraining(curriculum_steps=800, stages=4, q=2.0, k=8.0, b=1.0)
    assert [halvings(s, 800, 4) for s in (0, 199, 200, 599, 600, 10_000)] == [0, 0, 1, 2, 3, 3]
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=F64)
    assert torch.equal(obj.gap(sigma, 0), torch.zeros(4, dtype=F64))        # stage 0: r = 0 (denoising)
    for a in (1, 2, 3):
        n = 1 + 8 * torch.sigmoid(-sigma)
        want = (sigma - sigma * n / 2 ** a).clamp_min(0)
        assert torch.allclose(obj.gap(sigma, a), want)
        assert (obj.gap(sigma, a) >= obj.gap(sigma, a - 1)).all()          # r moves up to t: dt shrinks
    gen = Generator(MLP((2,), width=16, depth=1), obj, shape=(2,))
    for _ in range(600):
        obj.on_step_end(gen)
    out = obj.loss(gen, torch.randn(64, 2), None)
    assert out.metrics["stage"] == 3 and out.metrics["frac_r0"] < 1
    assert obj.loss(Generator(MLP((2,), width=16, depth=1), obj, shape=(2,)), torch.randn(64, 2), None) \
        .metrics["frac_r0"] == 1.0


def test_ect_loss_zero_at_the_oracle_on_a_point():
    obj = EasyConsistencyTraining(curriculum_steps=100, stages=2)
    oracle = PointOracle(X0)
    oracle.aux = {"ect_step": torch.nn.Module()}
    for step in (0, 99):
        counter = EasyConsistencyTraining().extra_modules(nn.Identity())["ect_step"]
        counter.step.fill_(step)
        oracle.aux = {"ect_step": counter}
        torch.manual_seed(0)
        assert obj.loss(oracle, X0.expand(64, 2).clone(), None).loss.abs().max() < 1e-12


# ---------------------------------------------------------------- ARTM
class ARTMPointOracle(nn.Module):
    """ARTM on the point ``x0``: features ``(z_t, t, x0)`` per token; the head's inner velocity is exact since
    ``Y = x0 - eps_t = (x0 - z_t) / t``; its context is ignored (the tokens are independent)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.aux = {"artm_head": self}

    def context(self, y):
        return torch.zeros(*y.shape[:2], 3, dtype=y.dtype)

    def tokenize(self, x):
        return x.reshape(x.shape[0], 2, 1)                                    # two tokens of width 1

    def untokenize(self, tokens):
        return tokens.reshape(tokens.shape[0], 2)

    def forward(self, *args, return_features=False):
        if not return_features:                                              # the head: (f, o, c, y, sigma)
            feats, _, _, y_sigma, sigma = args                               # feats: (z_i, t, x0_i)
            y = (feats[..., 2:] - feats[..., :1]) / feats[..., 1:2]
            return (y_sigma - y) / sigma[..., None]
        z, t = args[0], args[1]
        x0 = self.tokenize(self.x0.expand(z.shape[0], -1))
        feats = torch.cat([self.tokenize(z), t[:, None, None].expand(-1, 2, 1), x0], dim=-1)   # (B, 2, 3)
        return z, feats


def test_artm_point_oracle_loss_zero_and_sampling_exact():
    net = ARTMPointOracle(X0)
    for times in ("discrete", "continuous"):
        obj = AutoregressiveTransitionMatching(transition_steps=4, inner_steps=3, train_times=times)
        torch.manual_seed(0)
        assert obj.loss(net, X0.expand(64, 2).clone(), None).loss.abs().max() < 1e-20
    for steps in (1, 2, 4):
        torch.manual_seed(1)
        sample = obj.sample(net, torch.randn(16, 2, dtype=F64), None, steps)
        assert torch.allclose(sample, X0.expand(16, 2), atol=1e-12), steps


def test_artm_context_is_causal_and_the_head_trains_every_backbone_weight():
    torch.manual_seed(0)
    ctx = CausalContext(3, 16).double()
    y = torch.randn(4, 6, 3, dtype=F64)
    base = ctx(y)
    for j in range(6):
        y2 = y.clone()
        y2[:, j] += 1.0
        moved = (ctx(y2) - base).abs().amax((0, 2))
        assert (moved[: j + 1] == 0).all() and (moved[j + 1:] > 0).all()       # c_i sees Y^{<i} only
    gen = Generator(MLP((2,), width=16, depth=1), AutoregressiveTransitionMatching(head_width=16, head_depth=1),
                    shape=(2,))
    gen.compute_loss({"x": torch.randn(8, 2)}).loss.mean().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_artm_renoises_between_transitions():
    """The independent process: one sample with T = 2 uses fresh noise at the middle step, so two
    runs from the same initial noise differ (DTM's deterministic update would not add noise)."""
    torch.manual_seed(0)
    gen = Generator(MLP((2,), width=16, depth=1), AutoregressiveTransitionMatching(head_width=16, head_depth=1),
                    shape=(2,))
    noise = torch.randn(8, 2)
    torch.manual_seed(1)
    a = gen.generate(noise=noise, steps=2)
    torch.manual_seed(2)
    b = gen.generate(noise=noise, steps=2)
    assert a.shape == (8, 2) and not torch.allclose(a, b)


# ---------------------------------------------------------------- teachers from checkpoints
TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "trainer.batch_size=32", "trainer.eval_every=0",
        "trainer.eval_at_end=false", "task.eval_steps=[1]"]


def make_cfg(run_dir, *overrides):
    with initialize_config_module("jumpflow.configs", version_base=None):
        return compose("train", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name in ("flow_matching", "ddpm", "meanflow"):
        train(make_cfg(root / name, f"objective={name}", "trainer.max_steps=3"))
        out[name] = root / name
    return out


def test_a_missing_teacher_fails_before_anything_is_written(tmp_path):
    for name, key in (("distill_consistency", "teacher"), ("distill_ayf", "teacher"), ("ect", "init_from")):
        run_dir = tmp_path / name
        with pytest.raises(ConfigError) as err:
            train(make_cfg(run_dir, f"objective={name}", f"objective.{key}={tmp_path / 'nope'}", "trainer.max_steps=2"))
        assert err.value.key == f"objective.{key}" and "\n" not in str(err.value)
        assert not run_dir.exists()


def test_more_teacher_levels_than_the_ddpm_teacher_has_fail_before_anything_is_written(tmp_path, teachers):
    run_dir = tmp_path / "student"
    with pytest.raises(ConfigError, match="teacher has 100 levels") as err:
        train(make_cfg(run_dir, "objective=distill_consistency", f"objective.teacher={teachers['ddpm']}",
                       "objective.teacher_levels=101", "trainer.max_steps=2"))
    assert err.value.key == "objective.teacher_levels" and not run_dir.exists()


def test_a_teacher_of_the_wrong_kind_fails_before_anything_is_written(tmp_path, teachers):
    run_dir = tmp_path / "student"
    with pytest.raises(ConfigError, match="holds a meanflow model") as err:
        train(make_cfg(run_dir, "objective=distill_consistency", f"objective.teacher={teachers['meanflow']}",
                       "trainer.max_steps=2"))
    assert err.value.key == "objective.teacher" and not run_dir.exists()


@pytest.mark.parametrize("objective,teacher", [("distill_consistency", "flow_matching"),
                                               ("distill_ayf", "flow_matching"),
                                               ("distill_consistency", "ddpm"),
                                               ("distill_ayf", "ddpm")])
def test_student_checkpoint_holds_no_teacher_and_samples_without_it(tmp_path, teachers, objective, teacher):
    source = tmp_path / "teacher"
    shutil.copytree(teachers[teacher], source)
    run_dir = tmp_path / "student"
    train(make_cfg(run_dir, f"objective={objective}", f"objective.teacher={source}", "trainer.max_steps=2"))
    keys = load_file(str(resolve_checkpoint(run_dir).with_suffix(".safetensors"))).keys()
    teacher_keys = load_file(str(resolve_checkpoint(source).with_suffix(".safetensors"))).keys()
    assert not any("distill_teacher" in k for k in keys)
    assert len([k for k in keys if k.startswith("model.")]) == len([k for k in teacher_keys if k.startswith("model.")])
    shutil.rmtree(source)                                                    # the teacher file is gone
    model, cfg = load_model(run_dir)
    assert cfg.objective.teacher == str(source)
    x = model.generate(n=16, steps=1)
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_teacher_is_frozen_outside_the_student_and_initialises_it(teachers):
    from jumpflow.build import build_components

    cfg = make_cfg("/unused", "objective=distill_ayf", f"objective.teacher={teachers['flow_matching']}")
    model = build_components(cfg).model
    slot = model.aux["distill_teacher"]
    assert not slot.prepared
    model = model.to("cpu")                                                  # what the trainer does first
    teacher = slot.model()
    assert slot.prepared and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any("distill_teacher" in k for k in model.state_dict())
    assert len(list(model.parameters())) == len(list(teacher.parameters()))  # the teacher is not a submodule
    fm, _ = load_model(teachers["flow_matching"])
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 fm.backbone.state_dict().values()))
    model.train()
    assert not teacher.training
    model.double()
    assert next(teacher.parameters()).dtype == F64
    import copy
    twin = copy.deepcopy(model)                                              # the trainer's EMA copy
    assert twin.aux["distill_teacher"].model() is teacher


def test_ect_initialised_from_a_flow_checkpoint_and_loadable_without_it(tmp_path, teachers):
    source = tmp_path / "fm"
    shutil.copytree(teachers["flow_matching"], source)
    from jumpflow.build import build_components

    cfg = make_cfg(tmp_path / "ect", "objective=ect", f"objective.init_from={source}", "trainer.max_steps=2")
    model = build_components(cfg).model.to("cpu")
    fm, _ = load_model(source)
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 fm.backbone.state_dict().values()))
    assert model.aux["ect_init"].__dict__["_model"] is None                  # init only: not kept
    train(cfg)
    shutil.rmtree(source)
    student, _ = load_model(tmp_path / "ect")
    assert torch.isfinite(student.generate(n=8, steps=1)).all()


def test_conditional_student_encodes_as_the_teacher_through_training(tmp_path):
    """The student's condition encoder (a class embedding here) becomes the teacher's when the
    teacher is read, frozen, and stays so through training; one changed afterwards is refused."""
    train(make_cfg(tmp_path / "fm", "objective=flow_matching", "task.conditional=true", "task.cond_dim=8",
                   "trainer.max_steps=2"))
    teacher, _ = load_model(tmp_path / "fm")
    from jumpflow.build import build_components

    cfg = make_cfg(tmp_path / "student", "objective=distill_ayf", f"objective.teacher={tmp_path / 'fm'}",
                   "task.conditional=true", "task.cond_dim=8", "seed=1", "trainer.max_steps=3")
    model = build_components(cfg).model
    assert not any(p.requires_grad for p in model.cond_encoder.parameters())
    assert not _same_encoder(model, teacher)                                 # seed 1: its own init until read
    model = model.to("cpu")                                                  # the teacher is read
    assert _same_encoder(model, teacher)
    batch = {"x": torch.randn(8, 2), "cond": torch.tensor([0, 1] * 4)}
    assert torch.isfinite(model.compute_loss(batch).loss).all()
    train(cfg)                                                               # the trainer's path end to end
    student, _ = load_model(tmp_path / "student")
    assert _same_encoder(student, teacher)
    other = build_components(cfg).model.to("cpu")
    with torch.no_grad():
        next(other.cond_encoder.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match="condition encoder differs") as err:
        other.compute_loss(batch)
    assert err.value.key == "objective.teacher"


def _same_encoder(a, b) -> bool:
    sa, sb = a.cond_encoder.state_dict(), b.cond_encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_trainer_names_a_curriculum_the_run_cannot_finish(tmp_path, capsys):
    """sCT's default 10k-step tangent warm-up in a 3-step run: one warning line before training,
    naming the field; none once the warm-up fits the run."""
    train(make_cfg(tmp_path / "long", "objective=sct", "trainer.max_steps=3"))
    err = capsys.readouterr().err
    assert "objective.tangent_warmup_steps = 10000 but the run trains 3 steps" in err
    train(make_cfg(tmp_path / "fits", "objective=sct", "objective.tangent_warmup_steps=3", "trainer.max_steps=3"))
    assert "tangent_warmup_steps" not in capsys.readouterr().err


def test_a_teacher_whose_condition_encoder_differs_fails_in_one_line_naming_the_key(tmp_path):
    train(make_cfg(tmp_path / "fm", "objective=flow_matching", "task.conditional=true", "task.cond_dim=8",
                   "trainer.max_steps=2"))
    from jumpflow.build import build_components

    cfg = make_cfg(tmp_path / "student", "objective=distill_ayf", f"objective.teacher={tmp_path / 'fm'}",
                   "objective.init_student=false", "task.conditional=true", "task.cond_dim=16")
    model = build_components(cfg).model
    with pytest.raises(ConfigError, match="condition encoder of") as err:
        model.to("cpu")                                                      # the teacher is read here
    assert err.value.key == "objective.teacher" and "\n" not in str(err.value)
