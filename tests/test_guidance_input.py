"""Guidance as an input (one shared piece, Generator.guidance_condition): Drifting trained with
a sampled alpha takes alpha as a generator input, chosen at sampling."""

from __future__ import annotations

import pytest
import torch

from jumpflow.backbones import build_backbone
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import OBJECTIVES


def _drifting_generator():
    torch.manual_seed(0)
    obj = OBJECTIVES["drifting"](gen_per_group=4, n_uncond_neg=3, guidance_alpha={"low": 1.0, "high": 4.0},
                                 kernel="torch")
    return Generator(build_backbone("MLP", (2,), 8, width=32, depth=1), obj, ClassEmbedding(3, 8), shape=(2,))


def test_alpha_is_an_input_zero_at_init_and_learned():
    gen = _drifting_generator()
    assert gen.objective.guidance_input and gen.guidance_embed is not None
    labels, noise = torch.tensor([0, 1, 2, 0]), torch.randn(4, 2)
    same = [gen.generate(labels, noise=noise, guidance=a) for a in (1.0, 3.0)]
    assert torch.equal(same[0], same[1])                     # zero-initialised: the unguided generator
    x = torch.randn(12, 2) + torch.tensor([[3.0, 0.0]]) * torch.arange(3).repeat(4)[:, None]
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    for _ in range(5):              # the backbone's condition path is zero-initialised (FiLM), so the
        out = gen.compute_loss({"x": x, "cond": torch.arange(3).repeat(4)})     # embedding learns from step 2
        assert "alpha_mean" in out.metrics and 1.0 <= out.metrics["alpha_mean"] <= 4.0
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    assert gen.guidance_embed.mlp[-1].weight.grad.abs().sum() > 0    # alpha reached the generator
    after = [gen.generate(labels, noise=noise, guidance=a) for a in (1.0, 3.0)]
    assert not torch.allclose(after[0], after[1])


def test_objectives_without_a_guidance_input_refuse_it():
    torch.manual_seed(0)
    gen = Generator(build_backbone("MLP", (2,), 8, width=16, depth=1), OBJECTIVES["meanflow"](),
                    ClassEmbedding(3, 8), shape=(2,))
    assert gen.guidance_embed is None and "guidance_embed" not in "".join(gen.state_dict())
    with pytest.raises(ValueError, match="no guidance input"):
        gen.guidance_condition(torch.zeros(2, 8), torch.ones(2))
    with pytest.raises(ValueError, match="inference.guidance"):
        gen.generate(torch.tensor([0]), guidance=2.0)
