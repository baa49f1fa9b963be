"""Benchmark the drift-field kernels (numba vs torch) on the CPU.

Regimes: the policy regime (hundreds of small groups: a few generated chunks and one or
a few positives per observation, d ~ 100) where numba's fusion should win, and one large
dense group (image-like) where BLAS-backed torch is hard to beat.

    python -m bench.drift_kernel [--repeats 20]
"""

from __future__ import annotations

import time

import torch

from bench.common import arg_parser, parse_args, write_results
from jumpflow.drift import drift_field

CASES = [  # groups, gen, pos, d
    (256, 8, 1, 112),
    (256, 16, 4, 112),
    (1024, 8, 1, 64),
    (64, 32, 32, 64),
    (1, 1024, 1024, 64),
]


def time_call(fn, repeats):
    fn()  # warm-up (numba compile, torch allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = arg_parser(__doc__, threads=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=15)
    args = parse_args(ap, argv)
    temps = (0.02, 0.05, 0.2)
    rows = []
    for groups, g, p, d in CASES:
        gen = torch.randn(groups, g, d)
        pos = torch.randn(groups, p, d)
        ref = None
        for impl in ("numba", "torch"):
            out = drift_field(gen, pos, temperatures=temps, impl=impl)
            ref = out if ref is None else ref
            sec = time_call(lambda gen=gen, pos=pos, impl=impl: drift_field(gen, pos, temperatures=temps, impl=impl), args.repeats)
            m = p + g
            flops = groups * g * m * d * 2 * (1 + len(temps) * 1)   # distances + weighted sums per temperature
            rows.append({"impl": impl, "groups": groups, "gen": g, "pos": p, "d": d, "n_temps": len(temps),
                         "seconds": sec, "gflops": flops / sec / 1e9,
                         "max_abs_diff_vs_numba": float((out - ref).abs().max())})
    write_results("drift_kernel", {"repeats": args.repeats, "threads": args.threads, "dtype": "float32",
                                   "temperatures": temps}, rows)


if __name__ == "__main__":
    main()
