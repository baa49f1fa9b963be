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


class _Ungrouped(torch.nn.Module):
    """The same backbone without ``grouped_condition``: the objective must repeat every row."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shape = inner, inner.shape

    def forward(self, x, t, h, cond=None, **kw):
        assert t.shape[0] == x.shape[0] and (cond is None or cond.shape[0] == x.shape[0])
        return self.inner(x, t, h, cond, **kw)


@pytest.mark.parametrize("guided", [False, True])
def test_drifting_grouped_condition_is_the_same_loss_with_the_embedder_run_once_per_group(guided):
    """Drifting passes ``(t, h, cond)`` once per group to a net with grouped conditioning: the
    loss and every gradient equal the repeated-row path's (float64), while the time / condition
    embedder sees ``Gr`` rows instead of ``Gr * G``."""
    kw = {"n_uncond_neg": 3, "guidance_alpha": {"low": 1.0, "high": 4.0}} if guided else {}
    torch.manual_seed(0)
    backbone = build_backbone("MLP", (2,), 8, width=32, depth=2).double()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(12, 2, dtype=torch.float64)
    labels = torch.arange(3).repeat(4)
    results, rows_seen = [], []
    for net in (backbone, _Ungrouped(backbone)):
        torch.manual_seed(1)
        obj = OBJECTIVES["drifting"](gen_per_group=4, kernel="torch", **kw)
        gen = Generator(net, obj, ClassEmbedding(3, 8), shape=(2,)).double()
        if guided:
            with torch.no_grad():
                for p in gen.guidance_embed.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        handle = backbone.embed.register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))
        torch.manual_seed(2)
        loss = gen.compute_loss({"x": x, "cond": labels}).loss.mean()
        handle.remove()
        gen.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in gen.parameters() if p.grad is not None]))
    assert rows_seen == [3, 12]                          # 3 groups of 4 generated samples
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
