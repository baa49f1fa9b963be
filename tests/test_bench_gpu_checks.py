"""bench/gpu_checks: the checks a lent GPU runs. Their CPU path (``--device cpu``) is what a
session tests before a lease, and the JVP check's float64 answers are closed-form enough to
assert: a JVP through the DiT's attention equals a central difference, the fused attention
kernel equals the math path that the JVP uses."""

import pytest
import torch

from bench import gpu_checks


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_checks, "DEV", torch.device("cpu"))
    monkeypatch.setattr(gpu_checks, "SMALL", True)


def test_jvp_through_attention_matches_a_central_difference_in_float64(on_cpu):
    rows = {r["case"]: r for r in gpu_checks.check_jvp_attention()}
    fd = rows["float64 jvp vs central difference (cpu)"]
    assert fd["rel_err"] < 1e-7 and fd["tangent_norm"] > 1.0       # a non-trivial tangent, matched
    both = rows["float64 forward_ad vs functorch (cpu)"]              # the two JVP backends agree exactly
    assert both["grads"] > 0
    assert both["max_abs_diff_u"] == both["max_abs_diff_du"] == both["max_abs_diff_grad_through_tangent"] == 0.0
    assert rows["fp32 fused SDPA vs math path"]["rel_err"] < 1e-5
    # bf16 differs from fp32 by its rounding, not by a wrong path
    assert 1e-4 < rows["bf16 autocast fused vs fp32 math"]["rel_err"] < 5e-2


def test_unknown_check_bad_out_and_missing_cuda_fail_in_one_line(monkeypatch):
    with pytest.raises(SystemExit, match="unknown checks \\['nope'\\]"):
        gpu_checks.main(["--only", "env,nope"])
    with pytest.raises(SystemExit, match="--out: .* is not a folder"):
        gpu_checks.main(["--only", "env", "--out", "/nonexistent/folder"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_checks.main(["--only", "env"])


def test_timing_helpers_count_calls_on_the_cpu(on_cpu):
    calls = []
    sec = gpu_checks.cuda_seconds(lambda: calls.append(1), warmup=3, iters=10)
    assert len(calls) == 2 and sec >= 0                              # SMALL: one warm-up, one timed call
    p50, p95 = gpu_checks.wall_ms(lambda: calls.append(1))
    assert len(calls) == 2 + 3 and 0 <= p50 <= p95


def test_meanflow_steps_replay_a_draw_with_the_papers_jvp_share(on_cpu):
    from jumpflow.backbones import build_backbone
    from jumpflow.generator import Generator
    from jumpflow.objectives import FlowMatching, MeanFlow

    torch.manual_seed(0)
    backbone = build_backbone("UNet1D-S", (16, 7), 46, down_dims=(32, 64, 128))
    batch = {"x": torch.randn(16, 16, 7), "cond": torch.randn(16, 46)}
    mf = Generator(backbone, MeanFlow(), torch.nn.Identity(), shape=(16, 7))
    seed = gpu_checks.draw_seed(mf, batch)
    torch.manual_seed(seed)
    with torch.no_grad():
        assert mf.compute_loss(batch).metrics["frac_r_neq_t"] == 4 / 16          # round(0.25 * 16) rows
    assert gpu_checks.draw_seed(Generator(backbone, FlowMatching(), torch.nn.Identity(), shape=(16, 7)), batch) == 0
