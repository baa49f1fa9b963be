"""Forward-mode AD cost of an op between a dual tensor and a constant, against the forms the
backbones use instead (``layers.add_plain``, ``layers.scale_plain``, ``layers.modulate``, the
time features as ``F.linear``).

With only one operand carrying a tangent, torch gives the other a zero tangent (a ``ZeroTensor``)
whose arithmetic runs through a Python fallback: a fixed cost per op, whatever the tensor size,
that dominates a JVP step on a small backbone. Each case times ``torch.func.jvp`` of the torch
form and of jumpflow's form (same value and tangent; tests/test_backbones.py checks that in
float64), min over repeats, 1 thread::

    python -m bench.jvp_ops [--batch 8] [--width 256] [--repeats 200]
"""

from __future__ import annotations

import math
import time

import torch

from bench.common import arg_parser, parse_args, write_results
from jumpflow.backbones.embeddings import sinusoidal_embedding
from jumpflow.backbones.layers import add_plain, modulate, scale_plain


def _torch_time_features(t, dim: int = 256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]                                      # (B, half): dual x constant
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # (B, dim)


def cases(batch: int, width: int):
    """name -> (inputs, tangents, torch form, jumpflow form)."""
    g = torch.Generator().manual_seed(0)
    x, dx, s, ds = (torch.randn(batch, width, generator=g) for _ in range(4))
    c = torch.randn(batch, width, generator=g)
    t = torch.rand(batch, generator=g)
    return {
        "x + c (condition embedding)": ((x,), (dx,), lambda x_: x_ + c, lambda x_: add_plain(x_, c)),
        "x * 0.125 (attention scale)": ((x,), (dx,), lambda x_: x_ * 0.125, lambda x_: scale_plain(x_, 0.125)),
        "x * (1 + s) + b (FiLM)": ((x, s), (dx, ds), lambda x_, s_: x_ * (1 + s_) + s_,
                                   lambda x_, s_: modulate(x_, s_, s_)),
        "time features": ((t,), (torch.ones_like(t),), _torch_time_features,
                          lambda t_: sinusoidal_embedding(t_, 256)),
    }


def time_jvp(fn, primals, tangents, repeats: int) -> float:
    """Min seconds of one ``torch.func.jvp`` call (after 5 warm-up calls)."""
    for _ in range(5):
        torch.func.jvp(fn, primals, tangents)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.func.jvp(fn, primals, tangents)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=200)
    args = parse_args(ap, argv)
    rows = []
    for name, (primals, tangents, torch_form, ours) in cases(args.batch, args.width).items():
        torch_s = time_jvp(torch_form, primals, tangents, args.repeats)
        ours_s = time_jvp(ours, primals, tangents, args.repeats)
        rows.append({"op": name, "batch": args.batch, "width": args.width, "torch_form_us": torch_s * 1e6,
                     "jumpflow_form_us": ours_s * 1e6, "speedup": torch_s / ours_s})
    write_results("jvp_ops", {"repeats": args.repeats, "threads": args.threads,
                              "estimator": "min over repeats of one torch.func.jvp call"},
                  rows)


if __name__ == "__main__":
    main()
