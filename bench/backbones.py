"""Benchmark the shared backbones on the CPU: forward, forward + backward, and one training
step of Flow Matching vs MeanFlow (whose step adds a JVP through the backbone).

Cases: ``DiT-S/2`` on 32x32x4 latents (class-conditional, as on ImageNet latents) and the
1-D UNets on a 16 x 7 action chunk (observation features as the condition, as in
Diffusion Policy). The target is a MeanFlow step at most 1.6x a Flow Matching step.

    python -m bench.backbones [--batch 8] [--repeats 5] [--debug]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.common import write_results
from jumpflow.backbones import build_backbone
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import FlowMatching, MeanFlow

TARGET_RATIO = 1.6
# (backbone, shape, condition: ("class", num_classes) or ("vector", width), overrides)
CASES = [
    ("DiT-S/2", (4, 32, 32), ("class", 1000), {}),
    ("UNet1D-S", (16, 7), ("vector", 46), {}),
    ("UNet1D-M", (16, 7), ("vector", 46), {}),
]
DEBUG_CASES = [
    ("DiT-S/2", (4, 8, 8), ("class", 10), dict(hidden_size=64, depth=2, num_heads=2)),
    ("UNet1D-S", (16, 7), ("vector", 46), dict(down_dims=(32, 64, 128))),
]


def _timed(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(name, shape, condition, overrides, batch: int, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    kind, n = condition
    if kind == "class":
        cond_dim = overrides.get("hidden_size", 384)
        encoder = ClassEmbedding(n, cond_dim)
        raw_cond = torch.randint(0, n, (batch,))
    else:
        cond_dim, encoder = n, nn.Identity()
        raw_cond = torch.randn(batch, n)
    backbone = build_backbone(name, shape, cond_dim, **overrides)
    params = sum(p.numel() for p in backbone.parameters())
    x = torch.randn(batch, *shape)
    t = torch.rand(batch)
    h = torch.zeros(batch)
    inp = "x".join(str(s) for s in shape)
    rows = []

    def base(case, objective, seconds):
        return {"backbone": name, "input": inp, "batch": batch, "case": case, "objective": objective,
                "params": params, "sec_per_step": seconds}

    cond = encoder(raw_cond).detach()
    with torch.no_grad():
        rows.append(base("forward", None, _timed(lambda: backbone(x, t, h, cond), repeats, warmup)))

    def fwd_bwd():
        backbone.zero_grad(set_to_none=True)
        backbone(x, t, h, cond).pow(2).mean().backward()
    rows.append(base("forward+backward", None, _timed(fwd_bwd, repeats, warmup)))

    step_times = {}
    for obj in (FlowMatching(), MeanFlow()):
        gen = Generator(backbone, obj, encoder, shape=shape)
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95))

        def step():
            opt.zero_grad(set_to_none=True)
            gen.compute_loss({"x": x, "cond": raw_cond}).loss.mean().backward()
            opt.step()
        step_times[obj.name] = _timed(step, repeats, warmup)
        rows.append(base("train_step", obj.name, step_times[obj.name]))
    rows[-1]["vs_flow_matching"] = step_times["meanflow"] / step_times["flow_matching"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="tiny models, 1 repeat; writes backbones_debug.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = DEBUG_CASES if args.debug else CASES
    repeats, warmup = (1, 1) if args.debug else (args.repeats, args.warmup)
    rows = []
    for name, shape, condition, overrides in cases:
        rows += bench_case(name, shape, condition, overrides, args.batch, repeats, warmup)
        print(f"done {name} {shape}", flush=True)
    ratios = {r["backbone"]: r["vs_flow_matching"] for r in rows if "vs_flow_matching" in r}
    config = {"batch": args.batch, "repeats": repeats, "warmup": warmup, "dtype": "float32",
              "device": "cpu", "cases": [[c[0], list(c[1]), list(c[2]), c[3]] for c in cases],
              "train_step": "AdamW step of Generator.compute_loss (default FlowMatching / MeanFlow hyper-parameters)",
              "target_meanflow_over_flow_matching": TARGET_RATIO}
    write_results("backbones_debug" if args.debug else "backbones", config, rows)
    for name, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(f"{name}: MeanFlow step / Flow Matching step = {ratio:.2f}x ({verdict} the {TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
