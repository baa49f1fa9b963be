"""The one JVP every objective calls (``jumpflow.objectives.base.jvp``): forward-mode dual tensors
by default, ``torch.func.jvp`` inside ``jvp_backend("functorch")``. In float64 the two give the
same loss and the same gradients bit for bit for every objective that differentiates with a JVP
(TVM's gradient runs through the tangent output too), and the dual-tensor JVP matches a central
finite difference."""

import pytest
import torch

from jumpflow.backbones import build_backbone
from jumpflow.errors import ConfigError
from jumpflow.generator import Generator
from jumpflow.objectives import OBJECTIVES
from jumpflow.objectives.base import jvp, jvp_backend

JVP_OBJECTIVES = sorted(n for n, cls in OBJECTIVES.items() if getattr(cls, "uses_jvp", False))
BACKBONES = [("MLP", (8, 3), {"width": 32, "depth": 2}),
             ("UNet1D-S", (8, 3), {"down_dims": (16, 32)}),
             ("DiT-S/2", (2, 4, 4), {"hidden_size": 32, "depth": 1, "num_heads": 2})]


def _perturbed(name, shape, kw, cond_dim=5):
    torch.manual_seed(0)
    net = build_backbone(name, shape, cond_dim, **kw).double()
    with torch.no_grad():               # zero-initialised output layers would hide the tangent
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_the_jvp_objectives_are_the_expected_ones():
    # a new JVP objective must be added here knowingly (and is then covered below)
    assert set(JVP_OBJECTIVES) == {"alpha_flow", "distill_ayf", "improved_meanflow", "meanflow", "sct", "tvm"}


@pytest.mark.parametrize("name", JVP_OBJECTIVES)
@pytest.mark.parametrize("backbone", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_both_backends_give_the_same_loss_and_gradients_in_float64(name, backbone):
    bname, shape, kw = backbone
    results = []
    for which in ("forward_ad", "functorch"):
        net = _perturbed(bname, shape, kw)
        # MeanFlow's split (a plain forward + the JVP rows) is the path policy training takes: pin it
        obj = OBJECTIVES[name](jvp_rows="jump") if name == "meanflow" else OBJECTIVES[name]()
        gen = Generator(net, obj, torch.nn.Identity(), shape=shape).double()
        g = torch.Generator().manual_seed(3)
        batch = {"x": torch.randn(6, *shape, generator=g, dtype=torch.float64),
                 "cond": torch.randn(6, 5, generator=g, dtype=torch.float64)}
        torch.manual_seed(7)
        with jvp_backend(which):
            loss = gen.compute_loss(batch).loss.mean()
        grads = torch.autograd.grad(loss, [p for p in gen.parameters() if p.requires_grad], allow_unused=True)
        results.append((loss.detach(), [None if gr is None else gr.detach() for gr in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads_a)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_dual_tensor_jvp_matches_a_central_difference(backbone):
    bname, shape, kw = backbone
    net = _perturbed(bname, shape, kw)
    g = torch.Generator().manual_seed(1)
    x, tx = (torch.randn(3, *shape, generator=g, dtype=torch.float64) for _ in range(2))
    t, h = torch.rand(3, generator=g, dtype=torch.float64), 0.3 * torch.rand(3, generator=g, dtype=torch.float64)
    c = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def f(x_, t_):
        return net(x_, t_, h, c)
    out, d = jvp(f, (x, t), (tx, torch.ones_like(t)))
    eps = 1e-6
    fd = (f(x + eps * tx, t + eps) - f(x - eps * tx, t - eps)) / (2 * eps)
    assert torch.allclose(out, f(x, t), rtol=0, atol=1e-12)
    assert float((d - fd).detach().norm() / fd.detach().norm()) < 1e-7


def test_gradient_through_the_tangent_output_matches_functorch():
    net = _perturbed("MLP", (8, 3), {"width": 32, "depth": 2})
    x = torch.randn(4, 8, 3, dtype=torch.float64)
    s = torch.rand(4, dtype=torch.float64)
    c = torch.randn(4, 5, dtype=torch.float64)
    grads = []
    for which in ("forward_ad", "functorch"):
        with jvp_backend(which):
            _, d = jvp(lambda s_: net(x, s_, s_, c), (s,), (torch.ones_like(s),))
        grads.append(torch.autograd.grad(d.pow(2).sum(), list(net.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert any(a is not None and a.abs().sum() > 0 for a in grads[0])


def test_a_constant_function_has_a_zero_tangent_and_bad_input_is_refused():
    x = torch.randn(3)
    _, d = jvp(lambda x_: torch.ones(2), (x,), (x,))
    assert torch.equal(d, torch.zeros(2))
    with pytest.raises(ValueError, match="1 primals but 2 tangents"):
        jvp(lambda x_: x_, (x,), (x, x))
    with pytest.raises(ConfigError, match="jvp_backend: must be one of"), jvp_backend("jax"):
        pass


@pytest.mark.parametrize("name", ["meanflow", "tvm"])
def test_float32_training_curves_are_identical_under_both_backends(name):
    """The switch of backend is a pure speed change: ten AdamW steps in float32 give the same losses
    bit for bit (TVM's gradient runs through the tangent, MeanFlow's does not)."""
    curves = []
    for which in ("forward_ad", "functorch"):
        torch.manual_seed(0)
        net = build_backbone("MLP", (8, 3), 5, width=32, depth=2)
        gen = Generator(net, OBJECTIVES[name](), torch.nn.Identity(), shape=(8, 3))
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
        x, c = torch.randn(32, 8, 3), torch.randn(32, 5)
        losses = []
        for step in range(10):
            opt.zero_grad()
            torch.manual_seed(100 + step)
            with jvp_backend(which):
                loss = gen.compute_loss({"x": x, "cond": c}).loss.mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == curves[1]
    assert curves[0][0] != curves[0][-1]
