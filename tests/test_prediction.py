"""Data ("x") prediction: a backbone that estimates clean data, converted into each
objective's native output (float64, closed-form oracles)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jumpflow.backbones.mlp import MLP
from jumpflow.generator import Generator
from jumpflow.objectives import DDPM, Drifting, FlowMatching, MeanFlow, TerminalVelocityMatching
from jumpflow.objectives.base import DataPrediction, Inference
from jumpflow.timeconv import interpolate

X0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)


class DataOracle(nn.Module):
    """Point data ``x0``: the exact clean-data estimate is ``x0`` whatever the input."""

    shape = (2,)

    def __init__(self, x0):
        super().__init__()
        self.x0 = nn.Parameter(x0.clone(), requires_grad=False)

    def forward(self, z, t, h, cond=None):
        return self.x0.expand_as(z)


def point_batch(n=64):
    return {"x": X0.expand(n, 2).clone()}


def test_flow_matching_data_oracle_loss_zero_and_one_step_exact():
    obj = FlowMatching(time_sampler={"kind": "uniform", "low": 0.1}, prediction="data")
    gen = Generator(DataOracle(X0), obj, shape=(2,))
    assert isinstance(gen.backbone, DataPrediction)
    assert gen.compute_loss(point_batch()).loss.abs().max() < 1e-24
    noise = torch.randn(16, 2, dtype=torch.float64)
    assert torch.allclose(gen.generate(noise=noise, steps=1), X0.expand(16, 2), atol=1e-12)


def test_meanflow_data_oracle_loss_zero_for_every_r():
    obj = MeanFlow(time_sampler={"kind": "uniform", "low": 0.1}, ratio_r_neq_t=1.0, adaptive_p=0.0,
                   prediction="data")
    gen = Generator(DataOracle(X0), obj, shape=(2,))
    assert gen.compute_loss(point_batch()).loss.abs().max() < 1e-24
    noise = torch.randn(16, 2, dtype=torch.float64)
    for steps in (1, 3):
        assert torch.allclose(gen.generate(noise=noise, steps=steps), X0.expand(16, 2), atol=1e-12)


def test_tvm_data_oracle_loss_zero_and_target_wrapped():
    obj = TerminalVelocityMatching(gap_sampler={"kind": "uniform", "high": 0.5},
                                   terminal_sampler={"kind": "uniform", "low": 0.2},
                                   fm_sampler={"kind": "uniform", "low": 0.1}, prediction="data")   # t >= data_t_min
    gen = Generator(DataOracle(X0), obj, shape=(2,))
    assert isinstance(gen.aux["tvm_target"], DataPrediction)      # the EMA target converts too
    assert gen.compute_loss(point_batch()).loss.abs().max() < 1e-24


def test_data_t_min_floor_changes_the_output_below_it():
    obj = FlowMatching(prediction="data", data_t_min=0.2)
    z, x_hat = torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    u = obj.from_data_prediction(z, torch.tensor([0.5, 0.1], dtype=torch.float64), x_hat)
    assert torch.allclose(u[0], torch.full((2,), 2.0, dtype=torch.float64))   # 1 / 0.5
    assert torch.allclose(u[1], torch.full((2,), 5.0, dtype=torch.float64))   # 1 / max(0.1, 0.2)


def test_ddpm_data_prediction_recovers_eps_and_lands_on_data():
    obj = DDPM(num_train_steps=100, prediction="data", clip_sample=None)
    x = X0.expand(8, 2).clone()
    eps = torch.randn(8, 2, dtype=torch.float64)
    checked = 0
    for k in range(100):
        abar = obj.alphas_cumprod[k]
        if (1 - abar).sqrt() < obj.data_t_min:
            continue                                            # the floor applies there
        x_k = abar.sqrt() * x + (1 - abar).sqrt() * eps
        t = obj.net_time(torch.full((8,), k))
        assert torch.allclose(obj.from_data_prediction(x_k, t, x), eps, atol=1e-10), k
        checked += 1
    assert checked > 90
    gen = Generator(DataOracle(X0), obj, shape=(2,))
    for sampler in ("ddim", "ddpm"):
        out = obj.sample(gen, torch.randn(8, 2, dtype=torch.float64), None, Inference(steps=1, sampler=sampler))
        assert torch.allclose(out, x, atol=1e-10)


def test_drifting_data_prediction_is_the_sample():
    obj = Drifting()
    z, x_hat = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(obj.from_data_prediction(z, torch.ones(3), x_hat), x_hat)


def test_data_prediction_trains_down_on_two_points():
    torch.manual_seed(0)
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).repeat(64, 1)
    gen = Generator(MLP((2,), width=64, depth=2), FlowMatching(prediction="data"), shape=(2,))
    opt = torch.optim.Adam(gen.parameters(), 3e-3)
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    before = torch.cdist(gen.generate(noise=z, steps=20), x[:2]).min(1).values.mean()
    for _ in range(300):
        loss = gen.compute_loss({"x": x}).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.cdist(gen.generate(noise=z, steps=20), x[:2]).min(1).values.mean()
    assert after < 0.5 * before


@pytest.mark.parametrize("cls", [FlowMatching, MeanFlow, TerminalVelocityMatching, DDPM])
def test_bad_prediction_names_the_field(cls):
    with pytest.raises(ValueError, match="prediction"):
        cls(prediction="velocity")


def test_interpolate_consistent_with_conversion():
    """``from_data_prediction`` inverts the interpolation: ``x = z_t - t u``."""
    obj = FlowMatching(prediction="data")
    x, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 1.0], dtype=torch.float64)
    z = interpolate(x, eps, t)
    u = obj.from_data_prediction(z, t, x)
    assert torch.allclose(z - t[:, None] * u, x, atol=1e-12)
    assert torch.allclose(u, eps - x, atol=1e-12)
