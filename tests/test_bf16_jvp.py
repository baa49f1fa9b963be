"""bf16 JVPs (``trainer.jvp_bf16``): inside ``autocast_through_jvps`` an enclosing bf16 autocast
stays on through ``jvp_context``, and the JVP of every backbone family then matches the
float64 JVP to bf16's precision (about 1e-2 relative); without it the JVP runs in fp32 and
matches to fp32's. Both are checked, so neither path can silently become the other."""

import copy

import pytest
import torch

from jumpflow.backbones import build_backbone
from jumpflow.objectives.base import JVP_BACKENDS, autocast_through_jvps, jvp_backend
from jumpflow.objectives.base import jvp as objective_jvp

CASES = [
    ("MLP", (16, 7), {"width": 64, "depth": 2}),
    ("DiT-S/2", (4, 8, 8), {"hidden_size": 64, "depth": 2, "num_heads": 2}),
    ("UNet1D-S", (16, 7), {"down_dims": (32, 64, 128)}),
]


def perturbed(name, shape, kw):
    torch.manual_seed(0)
    net = build_backbone(name, shape, 12, **kw)
    with torch.no_grad():               # zero-initialised output layers would give a zero JVP
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def jvp(net, inputs, tangents, through: bool, backend: str):
    x, t, h, c = inputs

    def f(x_, t_):
        return net(x_, t_, h, c)
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_through_jvps(through), jvp_backend(backend):
        return objective_jvp(f, (x, t), tangents)


@pytest.mark.parametrize("backend", JVP_BACKENDS)
@pytest.mark.parametrize("name,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_jvp_under_autocast_through_jvps_is_bf16_and_matches_float64(name, shape, kw, backend):
    net = perturbed(name, shape, kw)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(4, *shape, generator=g), torch.rand(4, generator=g), 0.3 * torch.rand(4, generator=g),
              torch.randn(4, 12, generator=g))
    tangents = (torch.randn(4, *shape, generator=g), torch.ones(4))
    net64 = copy.deepcopy(net).double()
    u64, du64 = torch.func.jvp(lambda x_, t_: net64(x_, t_, inputs[2].double(), inputs[3].double()),
                               (inputs[0].double(), inputs[1].double()),
                               tuple(t.double() for t in tangents))

    def rel(a, b):
        b = b.detach()
        return float((a.detach().double() - b).norm() / b.norm())
    u, du = jvp(net, inputs, tangents, through=True, backend=backend)
    assert du.dtype == torch.bfloat16
    assert rel(u, u64) < 3e-2 and rel(du, du64) < 3e-2
    assert rel(du, du64) > 1e-4                          # bf16's rounding is there: it did run in bf16
    u, du = jvp(net, inputs, tangents, through=False, backend=backend)
    assert du.dtype == torch.float32
    assert rel(u, u64) < 1e-4 and rel(du, du64) < 1e-4


def test_autocast_through_jvps_is_scoped():
    from jumpflow.objectives import base

    assert base._AUTOCAST_THROUGH_JVPS.get() is False
    with autocast_through_jvps():
        assert base._AUTOCAST_THROUGH_JVPS.get() is True
        with autocast_through_jvps(False):
            assert base._AUTOCAST_THROUGH_JVPS.get() is False
        assert base._AUTOCAST_THROUGH_JVPS.get() is True
    assert base._AUTOCAST_THROUGH_JVPS.get() is False


@pytest.mark.parametrize("bf16,jvp_bf16", [(False, False), (True, False), (True, True)])
def test_loss_module_passes_jvp_bf16_to_the_objective(bf16, jvp_bf16):
    """The trainer's switch reaches ``jvp_context``: inside ``LossModule.forward`` the objective
    sees autocast on when ``bf16`` and the through-JVPs flag exactly when ``jvp_bf16`` too."""
    from types import SimpleNamespace

    from jumpflow.distributed import LossModule
    from jumpflow.objectives import base

    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def compute_loss(self, batch):
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            seen["through"] = base._AUTOCAST_THROUGH_JVPS.get()
            return SimpleNamespace(loss=self.w * batch, metrics={})

    loss, _ = LossModule(Probe(), bf16=bf16, jvp_bf16=jvp_bf16)(torch.ones(2))
    assert seen == {"autocast": bf16, "through": jvp_bf16} and float(loss) == 1.0
    assert base._AUTOCAST_THROUGH_JVPS.get() is False                   # reset after the step
