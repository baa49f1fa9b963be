"""Fidelity to the papers' / official codes' formulas (issue 15): each changed formula against a
float64 reference written here, independently, from the equations, on fixed random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr as phi
from torch import nn

import jumpflow.objectives.drifting as drifting_mod
from jumpflow.drift import drift_field, drift_field_numba, drift_field_torch
from jumpflow.objectives import DDPM, Drifting, MeanFlow, TerminalVelocityMatching, TransitionMatching
from jumpflow.objectives.base import Inference
from jumpflow.objectives.drifting import AlphaSampler, uncond_negative_weight
from jumpflow.objectives.tvm import truncated_logit_normal

TOL = 1e-6


def ks_uniform(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of samples ``u`` (already mapped through a CDF) to U(0, 1)."""
    u = np.sort(np.asarray(u, dtype=np.float64))
    n = u.size
    i = np.arange(1, n + 1)
    return float(max((i / n - u).max(), (u - (i - 1) / n).max()))


KS_BOUND_20K = 1.63 / math.sqrt(20_000)      # 1% critical value of the KS statistic


def logit(p):
    return np.log(p) - np.log1p(-p)


# ================================================================== drift field
def ref_drift(gen, pos, mask, neg, w_neg, taus, scale, floor, gen_as_neg=True):
    """Naive float64 loops over groups, from the Drifting paper / official ``drift_loss``:
    one distance scale ``S = sum w_j d_ij / sum w_j`` over every valid pair of every group
    (``scale="batch"``) or each group's unweighted mean (``"group"``); ``A = w_j sqrt(max(
    softmax_row * softmax_col, floor))``; ``V = sum_tau V_tau / rms(V_tau)``."""
    gen, pos = gen.numpy().astype(np.float64), pos.numpy().astype(np.float64)
    n_groups, g, d = gen.shape
    p = pos.shape[1]
    u = 0 if neg is None else neg.shape[1]
    neg = np.zeros((n_groups, 0, d)) if neg is None else neg.numpy().astype(np.float64)
    mask = np.ones((n_groups, p), bool) if mask is None else mask.numpy()
    w_neg = np.broadcast_to(np.asarray(w_neg, np.float64), (n_groups,))

    groups = []
    for k in range(n_groups):
        ys, ws, kinds = [], [], []                       # kinds: "pos" | ("gen", index) | "neg"
        for j in range(p):
            if mask[k, j]:
                ys.append(pos[k, j]), ws.append(1.0), kinds.append("pos")
        if gen_as_neg:
            for j in range(g):
                ys.append(gen[k, j]), ws.append(1.0), kinds.append(("gen", j))
        for j in range(u):
            ys.append(neg[k, j]), ws.append(w_neg[k]), kinds.append("neg")
        dist = np.zeros((g, len(ys)))
        valid = np.ones((g, len(ys)), bool)
        for i in range(g):
            for j, y in enumerate(ys):
                dist[i, j] = math.sqrt(sum((gen[k, i, c] - y[c]) ** 2 for c in range(d)))
                valid[i, j] = kinds[j] != ("gen", i)
        groups.append((np.array(ys), np.array(ws), kinds, dist, valid))

    if scale == "batch":
        num = sum((dist * ws[None] * valid).sum() for _, ws, _, dist, valid in groups)
        den = sum((np.broadcast_to(ws[None], valid.shape) * valid).sum() for _, ws, _, _, valid in groups)
        scales = [num / den] * n_groups
    else:
        scales = [(dist * valid).sum() / valid.sum() for _, _, _, dist, valid in groups]

    total = np.zeros((n_groups, g, d))
    for tau in taus:
        v = np.zeros((n_groups, g, d))
        for k, (ys, ws, kinds, dist, valid) in enumerate(groups):
            logits = np.where(valid, -dist / (scales[k] * tau), -np.inf)
            row = np.exp(logits - logits.max(1, keepdims=True))
            row /= row.sum(1, keepdims=True)
            col = np.exp(logits - logits.max(0, keepdims=True))
            col /= col.sum(0, keepdims=True)
            a = np.where(valid, np.sqrt(np.maximum(row * col, floor)), 0.0) * ws[None]
            is_pos = np.array([kd == "pos" for kd in kinds])
            for i in range(g):
                s_pos, s_neg = a[i, is_pos].sum(), a[i, ~is_pos].sum()
                v[k, i] = s_neg * (a[i, is_pos] @ ys[is_pos]) - s_pos * (a[i, ~is_pos] @ ys[~is_pos])
        total += v / math.sqrt((v ** 2).mean())
    return torch.from_numpy(total)


def drift_case(seed=0, groups=4, g=6, p=5, u=3, d=4):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    mask = torch.rand(groups, p, generator=gen) > 0.3
    mask[:, 0] = True
    # groups at different spreads, so that one batch scale and per-group scales differ
    spread = torch.linspace(0.5, 3.0, groups, dtype=torch.float64)[:, None, None]
    return mk(groups, g, d) * spread, mk(groups, p, d) * spread, mk(groups, u, d) * spread, mask


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("scale", ["batch", "group"])
def test_drift_field_equals_naive_reference(impl, scale):
    gen, pos, neg, mask = drift_case()
    w = torch.tensor([0.0, 0.4, 1.0, 2.5], dtype=torch.float64)         # per-group weights
    taus = (0.02, 0.05, 0.2)
    for floor in (0.0, 1e-6):
        ref = ref_drift(gen, pos, mask, neg, w, taus, scale, floor)
        out = drift_field(gen, pos, mask, neg, w, taus, impl=impl, scale=scale, floor=floor)
        assert (out - ref).abs().max() < TOL, (scale, floor)
    # the two scales are different formulas on this batch
    other = "group" if scale == "batch" else "batch"
    assert (drift_field(gen, pos, mask, neg, w, taus, impl=impl, scale=other) - ref).abs().max() > 1e-2


def test_drift_batch_scale_is_one_weighted_mean_over_all_groups():
    """Scaling every group by one common number leaves the batch-scale field's kernel unchanged
    (the field scales linearly), while rescaling one group alone changes the others' fields."""
    gen, pos, neg, mask = drift_case(1)
    f = lambda gen, pos, neg: drift_field(gen, pos, mask, neg, 0.5, impl="torch", normalize=False, scale="batch")
    base = f(gen, pos, neg)
    assert torch.allclose(f(3 * gen, 3 * pos, 3 * neg), 3 * base, atol=1e-10)
    gen2, pos2, neg2 = gen.clone(), pos.clone(), neg.clone()
    for t in (gen2, pos2, neg2):
        t[0] *= 10.0
    moved = f(gen2, pos2, neg2)
    assert (moved[1:] - base[1:]).abs().max() > 1e-3                    # group 0 moved the shared scale
    g_base = drift_field(gen, pos, mask, neg, 0.5, impl="torch", normalize=False, scale="group")
    g_moved = drift_field(gen2, pos2, mask, neg2, 0.5, impl="torch", normalize=False, scale="group")
    assert (g_moved[1:] - g_base[1:]).abs().max() < 1e-12                # per-group: untouched


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_affinity_floor_matches_reference_where_it_binds(impl):
    """Far outliers: every softmax product of their row underflows; the official floor gives
    each valid pair ``sqrt(1e-6)`` there instead of 0."""
    gen, pos, neg, mask = drift_case(2, groups=2, g=8, p=6, u=4, d=3)
    gen[:, 0] += 40.0
    gen[:, 1] -= 25.0
    taus = (0.02, 0.05, 0.2)
    ref = ref_drift(gen, pos, mask, neg, 1.0, taus, "batch", 1e-6)
    out = drift_field(gen, pos, mask, neg, 1.0, taus, impl=impl, floor=1e-6)
    assert (out - ref).abs().max() < TOL
    no_floor = drift_field(gen, pos, mask, neg, 1.0, taus, impl=impl, floor=0.0)
    assert (no_floor - ref_drift(gen, pos, mask, neg, 1.0, taus, "batch", 0.0)).abs().max() < TOL
    assert (out[:, :2] - no_floor[:, :2]).abs().max() > 1e-3           # the floor binds on the outliers


@pytest.mark.parametrize("scale", ["batch", "group"])
@pytest.mark.parametrize("floor", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("attraction_only", [False, True])
def test_numba_equals_torch_on_new_options(scale, floor, attraction_only):
    gen, pos, neg, mask = drift_case(3)
    w = torch.tensor([0.0, 0.3, 1.0, 4.0], dtype=torch.float64)
    for weight in (0.7, w):
        args = (gen, pos, mask, neg, weight, (0.02, 0.05, 0.2), True, attraction_only, scale, floor)
        assert (drift_field_torch(*args) - drift_field_numba(*args)).abs().max() < TOL
    # float32, the training dtype
    args32 = (gen.float(), pos.float(), mask, neg.float(), w.float(), (0.02, 0.05, 0.2), True, attraction_only,
              scale, floor)
    assert (drift_field_torch(*args32) - drift_field_numba(*args32)).abs().max() < 1e-4


@pytest.mark.parametrize("impl", ["torch", "numba"])
@pytest.mark.parametrize("scale", ["batch", "group"])
def test_per_location_field_is_the_official_folded_layout(impl, scale):
    """Blocks of ``T`` locations (``gen (Gr, G, T, d)``): the field is the naive reference on the
    official layout ``'(b f) x d'`` (location t of group r is group ``r*T + t``), built here by
    hand, with the per-group negative weight repeated per location; one batch scale and one rms
    over every group and location."""
    gen, pos, neg, mask = (a.reshape(2, a.shape[1], 3, 2) if a.dim() == 3 else a
                           for a in drift_case(4, groups=2, g=5, p=4, u=3, d=6))        # (2, K, 3 locations, 2)
    mask = mask[:, :4]
    w = torch.tensor([0.4, 1.3], dtype=torch.float64)
    taus = (0.05, 0.2)
    obj = Drifting(temperatures=taus, kernel=impl, scale=scale)
    v = obj._field(gen, pos, mask, neg, w)                                            # (2, 5, 3, 2)
    layout = lambda a: torch.stack([a[r, :, t] for r in range(2) for t in range(3)])   # (6, K, 2)
    ref = ref_drift(layout(gen), layout(pos), mask.repeat_interleave(3, 0), layout(neg),
                    w.repeat_interleave(3), taus, scale, 1e-6)                        # (6, 5, 2)
    assert v.shape == gen.shape
    assert (layout(v) - ref).abs().max() < TOL
    # one location per block is the plain field of the (Gr, G, d) groups
    one = obj._field(gen[:, :, :1], pos[:, :, :1], mask, neg[:, :, :1], w)[:, :, 0]
    assert (one - obj._field(gen[:, :, 0], pos[:, :, 0], mask, neg[:, :, 0], w)).abs().max() == 0


def test_per_location_blocks_in_the_loss_and_the_global_path(monkeypatch):
    """A feature map returning ``[(N, T, d)]``: the loss of each generated sample is the mean
    over its locations of ``|V|^2`` (its target is ``phi(x) + V``), and the sharded path given
    its own shard only is the single-process loss (float64)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = {"feature_map": lambda x: [x.unflatten(1, (3, 2)), x[:, :2]]}  # (N, 3, 2) and (N, 2)

        def forward(self, z, t, h, cond):
            return 0.5 * z + cond[:, :z.shape[1]]

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    cond = torch.nn.functional.one_hot(torch.arange(10) % 3, 6).double()
    obj = Drifting(gen_per_group=4, n_uncond_neg=2, uncond_weight=0.7, kernel="torch")
    seen = []
    real_field = obj._field
    monkeypatch.setattr(obj, "_field", lambda *a, **k: seen.append(real_field(*a, **k)) or seen[-1])
    torch.manual_seed(5)
    local = obj.loss(Net(), x, cond)
    v_loc, v_flat = seen                                                                # (3, 4, 3, 2), (3, 4, 2)
    want = v_loc.pow(2).flatten(2).mean(2).flatten() + v_flat.pow(2).mean(2).flatten()
    assert torch.allclose(local.loss, want, rtol=1e-12, atol=0) and float(want.min()) > 0
    monkeypatch.setattr(drifting_mod, "current_shards", lambda: object())
    monkeypatch.setattr(drifting_mod, "gather_shards", lambda payload: ([payload], 0))
    torch.manual_seed(5)
    glob = obj.loss(Net(), x, cond)
    assert torch.allclose(glob.loss, local.loss, rtol=1e-12, atol=1e-15)


def test_drift_field_rejects_bad_options():
    gen, pos, neg, mask = drift_case()
    with pytest.raises(ValueError, match="scale"):
        drift_field(gen, pos, scale="global")
    with pytest.raises(ValueError, match="floor"):
        drift_field(gen, pos, floor=-1.0)
    with pytest.raises(ValueError, match="neg_weight"):
        drift_field(gen, pos, mask, neg, torch.ones(3, dtype=torch.float64))
    for kwargs, field in [({"scale": "x"}, "scale"), ({"affinity_floor": -1e-6}, "affinity_floor"),
                          ({"guidance_alpha": {"low": 1, "high": 4}}, "guidance_alpha"),          # no negatives
                          ({"n_uncond_neg": 4, "guidance_alpha": {"low": 0.5}}, r"guidance_alpha\.low"),
                          ({"n_uncond_neg": 4, "guidance_alpha": {"gamma": 2}}, "guidance_alpha")]:
        with pytest.raises(ValueError, match=field):
            Drifting(**kwargs)


# ------------------------------------------------------------------ guidance alpha
def test_uncond_negative_weight_closed_form():
    alpha = torch.tensor([1.0, 1.5, 2.0, 4.0], dtype=torch.float64)
    for g, u in [(8, 4), (64, 32), (64, 16), (2, 1)]:
        ref = torch.tensor([(a - 1.0) * (g - 1) / u for a in alpha.tolist()], dtype=torch.float64)
        assert (uncond_negative_weight(alpha, g, u) - ref).abs().max() < 1e-15
    assert uncond_negative_weight(3.0, 64, 32) == 2.0 * 63 / 32


@pytest.mark.parametrize("power", [0.0, 1.0, 3.0, 5.0])
def test_alpha_power_law_cdf(power):
    """alpha on [1, 4] with density ~ alpha^-power: PIT through the analytic CDF is uniform."""
    torch.manual_seed(0)
    lo, hi = 1.0, 4.0
    a = AlphaSampler(lo, hi, power)(20_000).numpy()
    assert a.min() >= lo and a.max() <= hi
    if abs(power - 1.0) < 1e-12:
        cdf = np.log(a / lo) / np.log(hi / lo)
    else:
        e = 1.0 - power
        cdf = (a ** e - lo ** e) / (hi ** e - lo ** e)
    assert ks_uniform(cdf) < KS_BOUND_20K
    if power > 0:                                   # a power law puts more mass near alpha = 1
        assert np.median(a) < 0.5 * (lo + hi)


def test_alpha_no_guidance_fraction():
    torch.manual_seed(0)
    a = AlphaSampler(1.0, 4.0, 3.0, no_guidance_frac=0.5)(20_000)
    frac = (a == 1.0).double().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / 20_000)


class Recorder:
    """Wraps ``drift_field`` in the drifting module, keeping its arguments."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = drifting_mod.drift_field

        def wrapped(gen, pos, pos_mask=None, neg=None, neg_weight=1.0, *args, **kw):
            self.calls.append({"gen": gen, "pos": pos, "mask": pos_mask, "neg": neg, "neg_weight": neg_weight, **kw})
            return real(gen, pos, pos_mask, neg, neg_weight, *args, **kw)
        monkeypatch.setattr(drifting_mod, "drift_field", wrapped)


class TinyGen(nn.Module):
    """Generator stand-in: ``f(eps, c) = eps + c`` (cond broadcast), with a null condition and the
    guidance hook."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.aux = {}
        self.hook_calls = []

    def forward(self, x, t, h, cond):
        return self.scale * x + (0 if cond is None else cond[:, :1])

    def guidance_condition(self, cond, alpha):
        self.hook_calls.append((cond.clone(), alpha.clone()))
        return cond


@pytest.mark.parametrize("group_by", ["cond", "sample"])
def test_uncond_negatives_come_from_other_groups_only(monkeypatch, group_by):
    rec = Recorder(monkeypatch)
    torch.manual_seed(0)
    b = 24
    labels = torch.arange(b) % 3
    x = (torch.arange(b, dtype=torch.float64) * 1.0 + 100.0 * labels.double())[:, None]   # distinct rows
    cond = labels.double()[:, None]
    obj = Drifting(gen_per_group=4, group_by=group_by, n_uncond_neg=16, kernel="torch")
    obj.loss(TinyGen(), x, cond)
    call = rec.calls[0]
    pos, mask, neg = call["pos"], call["mask"], call["neg"]
    assert neg is not None and neg.shape[1] == 16
    for k in range(pos.shape[0]):
        own = set(pos[k][mask[k]].flatten().tolist())
        assert own and not own & set(neg[k].flatten().tolist())
        if group_by == "cond":   # every negative has another label
            own_label = int(pos[k][mask[k]][0, 0].item() // 100)
            assert all(int(v // 100) != own_label for v in neg[k].flatten().tolist())
    # one group (unconditional data): no other condition, so no guidance negatives
    rec.calls.clear()
    Drifting(gen_per_group=4, n_uncond_neg=8, kernel="torch").loss(TinyGen(), x, None)
    assert rec.calls[0]["neg"] is None


def test_uncond_negative_rows_are_uniform_over_other_groups():
    torch.manual_seed(0)
    row_group = torch.tensor([0, 0, 1, 2, 2, 2])
    rows = Drifting.uncond_negative_rows(row_group, 3, 30_000)
    for k in range(3):
        others = (row_group != k).nonzero().flatten()
        counts = torch.bincount(rows[k], minlength=6).double() / 30_000
        assert counts[row_group == k].sum() == 0
        assert (counts[others] - 1.0 / len(others)).abs().max() < 0.02
    assert Drifting.uncond_negative_rows(torch.zeros(5, dtype=torch.long), 1, 4) is None


def test_alpha_conditioned_weights_reach_the_field(monkeypatch):
    rec = Recorder(monkeypatch)
    torch.manual_seed(0)
    labels = torch.arange(12) % 4
    x = torch.randn(12, 2, dtype=torch.float64) + 5 * labels.double()[:, None]
    cond = labels.double()[:, None]
    g, u = 6, 5
    obj = Drifting(gen_per_group=g, n_uncond_neg=u, kernel="torch",
                   guidance_alpha={"low": 1.0, "high": 4.0, "power": 3.0})
    alpha = torch.tensor([1.0, 1.7, 2.5, 4.0], dtype=torch.float64)
    obj.alpha_sampler = lambda n, device=None: alpha[:n].clone()
    net = TinyGen()
    out = obj.loss(net, x, cond)
    w = rec.calls[0]["neg_weight"]
    ref = torch.tensor([(a - 1) * (g - 1) / u for a in alpha.tolist()], dtype=torch.float64)
    assert (w - ref).abs().max() < 1e-15
    assert abs(out.metrics["alpha_mean"] - alpha.mean().item()) < 1e-12
    # the hook sees alpha repeated for each of the group's G generated rows
    (hook_cond, hook_alpha), = net.hook_calls
    assert torch.equal(hook_alpha, alpha.repeat_interleave(g)) and hook_cond.shape[0] == 4 * g
    assert rec.calls[0]["scale"] == "batch" and rec.calls[0]["floor"] == 1e-6


# ================================================================== TVM
def truncated_cdf(s, gap, mean=-0.4, std=1.0):
    """Analytic CDF of sigmoid(N(mean, std^2)) truncated to (0, 1 - gap), evaluated at s."""
    return phi((logit(s) - mean) / std) / phi((logit(1.0 - gap) - mean) / std)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tvm_truncated_terminal_time(dtype):
    torch.manual_seed(0)
    obj = TerminalVelocityMatching()
    t, s, t_fm = obj.sample_times(20_000, "cpu", dtype)
    torch.manual_seed(0)
    gap = obj.gap_sampler(20_000, "cpu", dtype)         # sample_times draws the gap first
    assert t.dtype == s.dtype == t_fm.dtype == dtype
    assert torch.all(s > 0) and torch.all(s < 1 - gap)  # support (0, 1 - gap), in the working dtype
    assert torch.all(t <= 1) and torch.allclose(t, s + gap)
    u = truncated_cdf(s.double().numpy(), gap.double().numpy())
    assert ks_uniform(u) < KS_BOUND_20K * (1.0 if dtype == torch.float64 else 1.05)


def test_tvm_truncated_sampler_fixed_cut_and_scaled_is_different():
    torch.manual_seed(1)
    upper = torch.full((20_000,), 0.3, dtype=torch.float64)
    s = truncated_logit_normal(-0.4, 1.0, upper)
    assert torch.all(s > 0) and torch.all(s <= 0.3)
    assert ks_uniform(truncated_cdf(s.numpy(), 0.7)) < KS_BOUND_20K
    # the earlier s = sigmoid(N) * (1 - gap) has another law
    torch.manual_seed(0)
    _, s_old, _ = TerminalVelocityMatching(s_sampler="scaled").sample_times(20_000, "cpu", torch.float64)
    torch.manual_seed(0)
    gap = TerminalVelocityMatching().gap_sampler(20_000, "cpu", torch.float64)
    assert ks_uniform(truncated_cdf(s_old.numpy(), gap.numpy())) > 5 * KS_BOUND_20K


def test_tvm_fm_time_is_independent_logit_normal():
    torch.manual_seed(0)
    t, s, t_fm = TerminalVelocityMatching().sample_times(20_000, "cpu", torch.float64)
    assert ks_uniform(phi((logit(t_fm.numpy()) + 0.4) / 1.0)) < KS_BOUND_20K
    for other in (t, s):
        corr = np.corrcoef(t_fm.numpy(), other.numpy())[0, 1]
        assert abs(corr) < 4 / math.sqrt(20_000)
    # ... and it is what the flow-matching term uses: a net call with h = 0 at t_fm
    net = _FlowTermRecorder()
    x = torch.randn(64, 2, dtype=torch.float64)
    obj = TerminalVelocityMatching()
    torch.manual_seed(3)
    torch.randn_like(x)                                 # the loss draws eps first
    _, _, t_fm = obj.sample_times(64, "cpu", torch.float64)
    torch.manual_seed(3)
    obj.loss(net, x, None)
    assert len(net.seen) == 1 and torch.equal(net.seen[0][1], t_fm)


class _FlowTermRecorder(nn.Module):
    """``F = z / 2`` against a zero EMA target; records ``(z, t)`` of the flow-matching call (the
    one with ``h = 0``: the JVP call has ``h = t - s > 0``)."""

    def __init__(self):
        super().__init__()
        self.aux = {"tvm_target": lambda z, t, h, c: torch.zeros_like(z)}
        self.seen = []

    def forward(self, z, t, h, cond):
        if bool(torch.all(h == 0)):
            self.seen.append((z.detach().clone(), t.detach().clone()))
        return z * 0.5


def test_tvm_fm_time_at_the_jump_start_is_t_on_z_t():
    """``fm_time="jump_start"`` (the earlier form): the flow-matching term is the net at ``(z_t, t,
    h = 0)`` with the same ``eps``, and no flow-matching time is drawn (one fewer random draw)."""
    net = _FlowTermRecorder()
    obj = TerminalVelocityMatching(fm_time="jump_start")
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    eps = torch.randn_like(x)
    t, _s, t_fm = obj.sample_times(64, "cpu", torch.float64)
    after_times = torch.get_rng_state()
    assert torch.equal(t_fm, t)
    torch.manual_seed(3)
    torch.randn_like(x)
    TerminalVelocityMatching().sample_times(64, "cpu", torch.float64)
    assert not torch.equal(torch.get_rng_state(), after_times)          # the official form draws u
    torch.manual_seed(3)
    obj.loss(net, x, None)
    z_t = (1 - t)[:, None] * x + t[:, None] * eps
    assert len(net.seen) == 1 and torch.equal(net.seen[0][1], t)
    assert torch.allclose(net.seen[0][0], z_t, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="fm_time"):
        TerminalVelocityMatching(fm_time="start")


@pytest.mark.parametrize("cls,kwargs,field", [
    (TerminalVelocityMatching, {"s_sampler": "clipped"}, "s_sampler"),
    (TerminalVelocityMatching, {"fm_sampler": {"kind": "beta"}}, r"fm_sampler\.kind"),
    (DDPM, {"dp_exact": "yes"}, "dp_exact"),
])
def test_new_options_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


# ================================================================== MeanFlow
def test_meanflow_adaptive_weight_uses_the_sum():
    err = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = err.numpy().reshape(6, -1)
    for p, c in [(1.0, 1e-2), (0.5, 1e-3), (2.0, 0.1)]:
        ref_sum = 1.0 / (np.sum(e ** 2, 1) + c) ** p
        ref_mean = 1.0 / (np.mean(e ** 2, 1) + c) ** p
        assert np.abs(MeanFlow(adaptive_p=p, adaptive_c=c).adaptive_weight(err).numpy() - ref_sum).max() < 1e-12
        w_mean = MeanFlow(adaptive_p=p, adaptive_c=c, adaptive_reduce="mean").adaptive_weight(err).numpy()
        assert np.abs(w_mean - ref_mean).max() < 1e-12
    with pytest.raises(ValueError, match="adaptive_reduce"):
        MeanFlow(adaptive_reduce="max")


def test_adaptive_weight_gradient_norm_is_pseudo_huber_at_half_and_falls_at_one():
    """The weighted loss ``sg(w) * ||err||^2`` has gradient ``2 w err``, whose norm is
    ``2 ||err|| / (||err||^2 + c)^p``: bounded by 2 and tending to 2 at ``p = 1/2`` (the
    pseudo-Huber gradient, sCT's normalised push), falling as ``2 / ||err||`` at ``p = 1``."""
    from jumpflow.objectives.base import adaptive_loss_weight
    c = 1e-2
    scales = torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3], dtype=torch.float64)
    direction = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    err0 = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1) * scales.view(-1, 1, 1)
    norms = scales.numpy()
    for p, ref in [(0.5, 2 * norms / np.sqrt(norms ** 2 + c)), (1.0, 2 * norms / (norms ** 2 + c))]:
        err = err0.clone().requires_grad_(True)
        loss = (adaptive_loss_weight(err, p, c) * err.pow(2).flatten(1).sum(1)).sum()
        (grad,) = torch.autograd.grad(loss, err)
        got = grad.flatten(1).norm(dim=1).numpy()
        assert np.abs(got - ref).max() < 1e-12 * max(1.0, ref.max())


@pytest.mark.parametrize("p, expected", [(0.0, 0.3), (0.5, 0.0), (1.0, 0.0)])
def test_adaptive_weight_fixed_point_is_mean_median_mode(p, expected):
    """What a net trained with ``sg(w) * err^2`` converges to when one input has several targets:
    the stationary ``u`` of ``E[w (u - Y)^2]`` with ``w`` held fixed solves ``E[w (u - Y)] = 0``,
    i.e. the fixed point of ``u <- E[w Y] / E[w]`` (iteratively reweighted least squares). For
    ``Y`` in ``{0, 1}`` with probabilities ``0.7 / 0.3``: ``p = 0`` gives the mean 0.3 (what
    MeanFlow's identity needs), ``p = 1/2`` the median 0 (pseudo-Huber, L1-like) and ``p = 1``
    the majority target 0 (mode-seeking), starting from the mean; the actual loss's gradient
    vanishes there."""
    from jumpflow.objectives.base import adaptive_loss_weight
    targets = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1)
    probs = torch.tensor([0.7, 0.3], dtype=torch.float64)
    c = 1e-8
    u = torch.tensor(0.3, dtype=torch.float64)
    for _ in range(200):
        w = probs * adaptive_loss_weight(u - targets, p, c)
        u = (w * targets.view(-1)).sum() / w.sum()
    assert abs(u.item() - expected) < 1e-3
    u = u.clone().requires_grad_(True)
    err = u - targets
    loss = (probs * adaptive_loss_weight(err, p, c) * err.pow(2).view(-1)).sum()
    (grad,) = torch.autograd.grad(loss, u)
    assert abs(grad.item()) < 1e-6


def test_meanflow_loss_is_sum_weight_times_mean_error():
    """A constant net ``u = c0``: ``du/dt = 0``, so ``u_tgt = v = eps - x`` and the loss is
    ``mean_d err^2 / (sum_d err^2 + c)^p`` with ``err = c0 - v``."""
    c0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)

    class Const(nn.Module):
        def forward(self, z, t, h, cond):
            return torch.zeros_like(z) + c0

    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    eps = torch.randn_like(x)
    torch.manual_seed(5)
    out = MeanFlow().loss(Const(), x, None)
    err = (c0 - (eps - x)).numpy()
    ref = np.mean(err ** 2, 1) / (np.sum(err ** 2, 1) + 1e-2)
    assert np.abs(out.loss.detach().numpy() - ref).max() < 1e-12


# ================================================================== DDPM (Diffusion Policy exact)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 100])
def test_ddpm_dp_exact_leading_timesteps(steps):
    k = 100
    ref = (np.arange(0, steps) * (k // steps))[::-1].tolist()      # diffusers set_timesteps, "leading"
    assert DDPM(num_train_steps=k, dp_exact=True).timesteps(steps) == ref
    if steps == 1:
        assert ref == [0]
    trailing = DDPM(num_train_steps=k).timesteps(steps)
    assert trailing[0] == k - 1 and len(trailing) == steps


class EpsNet(nn.Module):
    """Records its time inputs; predicts ``eps = a * x_k`` (the exact eps when data is 0 and
    ``a = sqrt(1 - abar)``; here a fixed 1.7 so that clipping binds)."""

    def __init__(self, a=1.7):
        super().__init__()
        self.a, self.seen = a, []

    def forward(self, x, t, h, cond):
        self.seen.append(t.clone())
        return self.a * x


def ref_ddim(noise, ks, abar, a, clip, rederive):
    """DDIM (eta = 0) in float64, from Song et al. eq. 12 with diffusers' clipping."""
    x = noise.clone()
    for i, k in enumerate(ks):
        a_t = abar[k]
        a_p = abar[ks[i + 1]] if i + 1 < len(ks) else 1.0
        eps = a * x
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-clip, clip)
        if rederive:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    return x


@pytest.mark.parametrize("dp_exact", [True, False])
def test_ddim_unclipped_eps_and_integer_time(dp_exact):
    obj = DDPM(num_train_steps=100, dp_exact=dp_exact)
    abar = obj.alphas_cumprod.tolist()
    noise = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    net = EpsNet()
    out = obj.sample(net, noise, None, Inference(steps=10, sampler="ddim"))
    ks = obj.timesteps(10)
    ref = ref_ddim(noise, ks, abar, net.a, 1.0, rederive=not dp_exact)
    assert (out - ref).abs().max() < TOL
    times = [float(t[0]) for t in net.seen]
    if dp_exact:
        assert ks == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0] and times == [float(k) for k in ks]
    else:
        assert ks[0] == 99 and times == pytest.approx([(k + 1) / 100 for k in ks], abs=1e-12)
    other = ref_ddim(noise, ks, abar, net.a, 1.0, rederive=dp_exact)
    assert (out - other).abs().max() > 1e-3                         # the two DDIM choices differ here


def test_ddpm_one_step_leading_starts_at_k0():
    """DDPM-1 with leading spacing is one posterior step from k = 0: the clipped x0_hat."""
    obj = DDPM(num_train_steps=100, dp_exact=True)
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = EpsNet(a=0.3)
    out = obj.sample(net, noise, None, Inference(steps=1, sampler="ddpm"))
    assert len(net.seen) == 1 and torch.all(net.seen[0] == 0.0)
    a0 = obj.alphas_cumprod[0].item()
    ref = ((noise - math.sqrt(1 - a0) * 0.3 * noise) / math.sqrt(a0)).clamp(-1, 1)
    assert (out - ref).abs().max() < TOL


def test_ddpm_dp_exact_training_time_and_data_conversion_round_trip():
    obj = DDPM(num_train_steps=100, dp_exact=True, prediction="data", clip_sample=None)
    k = torch.arange(100)
    assert torch.equal(obj.net_time(k), k.double())
    assert torch.equal(obj.train_index(obj.net_time(k)), k)
    seen = EpsNet()
    torch.manual_seed(0)
    DDPM(num_train_steps=100, dp_exact=True).loss(seen, torch.randn(64, 2), None)
    t = seen.seen[0]
    assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 99
    x, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    kk = torch.tensor([3, 20, 50, 99])
    a = obj.alphas_cumprod[kk][:, None]
    x_k = a.sqrt() * x + (1 - a).sqrt() * eps
    assert (obj.from_data_prediction(x_k, obj.net_time(kk), x) - eps).abs().max() < 1e-10


# ================================================================== DTM
class ToyDTMNet(nn.Module):
    """Features ``phi(z, c) = [z, c]`` per token (2 tokens of width 2); head
    ``g(phi, y, sigma) = y - 0.5 (1 + sigma) * (z + c)`` (a fixed, known velocity)."""

    def __init__(self):
        super().__init__()
        self.seen_cond = []
        self.aux = {"transition_head": self.head}

    @staticmethod
    def head(feats, y, sigma):
        z, c = feats[..., :2], feats[..., 2:]
        return y - 0.5 * (1 + sigma[..., None]) * (z + c)

    def tokenize(self, x):
        return x.reshape(x.shape[0], 2, 2)

    def untokenize(self, tokens):
        return tokens.reshape(tokens.shape[0], 4)

    def null_cond(self, cond):
        return torch.full_like(cond, -7.0)

    def forward(self, x, t, h, cond, return_features=False):
        self.seen_cond.append(cond.clone())
        tok = self.tokenize(x)
        c = cond[:, None, :2].expand(-1, 2, -1)
        return x, torch.cat([tok, c], -1)


def ref_dtm_sample(noise, cond, null, w, steps, inner):
    """DTM sampling with CFG on the head's velocity, written out: per transition, ``Y`` from
    ``eta`` by Euler on ``g_w = g_null + w (g_c - g_null)``, then ``z += Y / steps``."""
    z = noise.clone()
    for _ in range(steps):
        tok = z.reshape(z.shape[0], 2, 2)
        f_c = torch.cat([tok, cond[:, None, :2].expand(-1, 2, -1)], -1)
        f_n = torch.cat([tok, null[:, None, :2].expand(-1, 2, -1)], -1)
        y = torch.randn_like(tok)
        for j in range(inner):
            sig = torch.full(y.shape[:2], 1.0 - j / inner, dtype=z.dtype)
            g_c, g_n = ToyDTMNet.head(f_c, y, sig), ToyDTMNet.head(f_n, y, sig)
            y = y - (g_n + w * (g_c - g_n)) / inner
        z = z + y.reshape(z.shape[0], 4) / steps
    return z


@pytest.mark.parametrize("w", [1.0, 0.0, 2.5])
def test_dtm_guidance_on_head_velocity(w):
    obj = TransitionMatching(transition_steps=3, inner_steps=5)
    noise = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = ToyDTMNet()
    torch.manual_seed(7)
    out = obj.sample(net, noise, cond, Inference(guidance=w))
    torch.manual_seed(7)
    ref = ref_dtm_sample(noise, cond, net.null_cond(cond), w, 3, 5)
    assert (out - ref).abs().max() < TOL
    if w == 1.0:                     # no guidance: one backbone pass per transition, on c only
        assert all(c.shape[0] == 8 and not (c == -7.0).any() for c in net.seen_cond)
    else:
        torch.manual_seed(7)
        plain = obj.sample(ToyDTMNet(), noise, cond, 3)
        assert (out - plain).abs().max() > 1e-3


def test_dtm_label_dropout_rate():
    obj = TransitionMatching(transition_steps=2, class_drop_prob=0.3, head_samples=1)
    net = ToyDTMNet()
    torch.manual_seed(0)
    n = 20_000
    obj.loss(net, torch.randn(n, 4), torch.randn(n, 2).abs() + 1.0)
    dropped = (net.seen_cond[0] == -7.0).all(1)
    assert (dropped | (net.seen_cond[0] > 0).all(1)).all()          # each row: its cond or the null one
    assert abs(dropped.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    with pytest.raises(ValueError, match="class_drop_prob"):
        TransitionMatching(class_drop_prob=1.0)


# ================================================================== adaptive weight (shared)
class _ZeroNetConstTarget(nn.Module):
    """``F = 0`` (so ``df/ds = 0``) against an EMA target that returns the constant ``c0``: the
    terminal error is ``-c0`` on every row, exactly."""

    def __init__(self, c0: torch.Tensor):
        super().__init__()
        self.aux = {"tvm_target": lambda z, t, h, c: torch.zeros_like(z) + c0}

    def forward(self, z, t, h, cond):
        return torch.zeros_like(z)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_tvm_adaptive_weight_is_meanflows(reduce, p):
    """TVM's adaptive terminal weight is MeanFlow's ``1 / (||err||^2 + c)^p`` with the same
    reduction (float64, closed form): ``err = -c0`` per row, the loss ``mean_d c0^2 * w``."""
    c0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)      # (2, 2) sample shape
    c = 1e-2
    obj = TerminalVelocityMatching(lambda_fm=0.0, adaptive_c=c, adaptive_p=p, adaptive_reduce=reduce)
    x = torch.randn(5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = obj.loss(_ZeroNetConstTarget(c0), x, None)
    sq = c0.numpy() ** 2
    norm = sq.sum() if reduce == "sum" else sq.mean()
    ref = sq.mean() / (norm + c) ** p
    assert np.abs(out.loss.detach().numpy() - ref).max() < 1e-12
    unweighted = TerminalVelocityMatching(lambda_fm=0.0).loss(_ZeroNetConstTarget(c0), x, None)
    assert np.abs(unweighted.loss.numpy() - sq.mean()).max() < 1e-12
    # the same function weights MeanFlow's loss
    err = torch.randn(4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mf = MeanFlow(adaptive_p=p, adaptive_c=c, adaptive_reduce=reduce).adaptive_weight(err)
    e2 = err.pow(2).flatten(1)
    assert torch.allclose(mf, ((e2.sum(1) if reduce == "sum" else e2.mean(1)) + c).pow(-p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, field", [({"adaptive_p": -1.0}, "adaptive_p"),
                                           ({"adaptive_reduce": "max"}, "adaptive_reduce"),
                                           ({"adaptive_c": 0.0}, "adaptive_c")])
def test_tvm_adaptive_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TerminalVelocityMatching(**kwargs)
