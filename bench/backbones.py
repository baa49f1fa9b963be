"""Benchmark the shared backbones on the CPU: forward, forward + backward, and one training
step of Flow Matching vs MeanFlow (whose step adds a JVP through the backbone).

Cases: ``DiT-S/2`` on 32x32x4 latents (class-conditional, as on ImageNet latents) and the
1-D UNets on a 16 x 7 action chunk (observation features as the condition, as in
Diffusion Policy). The target is a MeanFlow step at most 1.5x a Flow Matching step; MeanFlow is
timed with ``jvp_rows: jump`` (the JVP on the ``r != t`` rows, ``meanflow_jump``) and ``all`` (one
JVP over the batch, ``meanflow_jvp_all``), the row its default ``auto`` picks marked ``default``;
both again through ``torch.func.jvp`` in place of the default forward-mode dual tensors
(``*_functorch``).

    python -m bench.backbones [--batch 8] [--repeats 5] [--debug]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bench.common import write_results
from jumpflow.backbones import build_backbone
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import FlowMatching, MeanFlow
from jumpflow.objectives.base import jvp_backend

TARGET_RATIO = 1.5
# (backbone, shape, condition: ("class", num_classes) or ("vector", width), batch (None: --batch), overrides)
CASES = [
    ("DiT-S/2", (4, 32, 32), ("class", 1000), None, {}),
    ("UNet1D-S", (16, 7), ("vector", 46), None, {}),
    ("UNet1D-M", (16, 7), ("vector", 46), None, {}),
    ("UNet1D-S", (16, 7), ("vector", 46), 64, {}),     # per-op overhead vs compute: a larger batch
]
DEBUG_CASES = [
    ("DiT-S/2", (4, 8, 8), ("class", 10), None, {"hidden_size": 64, "depth": 2, "num_heads": 2}),
    ("UNet1D-S", (16, 7), ("vector", 46), None, {"down_dims": (32, 64, 128)}),
]


def representative_draw(gen, x, raw_cond, tries: int = 200) -> tuple[int, int]:
    """``(seed, rows)``: the first seed whose MeanFlow draw has ``round(ratio_r_neq_t * B)`` rows
    with ``r != t`` (the rows that take a JVP), read from the loss's own metric."""
    want = round(gen.objective.ratio_r_neq_t * x.shape[0])
    for seed in range(tries):
        torch.manual_seed(seed)
        with torch.no_grad():
            rows = round(gen.compute_loss({"x": x, "cond": raw_cond}).metrics["frac_r_neq_t"] * x.shape[0])
        if rows == want:
            return seed, rows
    raise RuntimeError(f"no draw with {want} of {x.shape[0]} rows r != t in {tries} seeds")


def bench_case(name, shape, condition, overrides, batch: int, repeats: int, warmup: int,
               min_seconds: float = 0.0) -> list[dict]:
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

    def base(case, objective, times, cpu_times):
        # min over repeats: the machine is shared, and interference only ever adds time
        return {"backbone": name, "input": inp, "batch": batch, "case": case, "objective": objective,
                "params": params, "sec_per_step": min(times), "sec_median": statistics.median(times),
                "cpu_sec_per_step": min(cpu_times), "repeats": len(times)}

    cond = encoder(raw_cond).detach()

    def forward():
        with torch.no_grad():
            backbone(x, t, h, cond)

    def forward_backward():
        backbone.zero_grad(set_to_none=True)
        backbone(x, t, h, cond).pow(2).mean().backward()

    cases = {("forward", None): forward, ("forward+backward", None): forward_backward}
    # MeanFlow's JVP runs on the rows with r != t only, so a step's cost depends on its draw: every
    # repetition replays one draw with the paper's share of such rows, or the minimum over
    # repetitions would pick the luckiest (fewest JVP rows)
    draw_seed, jvp_rows = representative_draw(Generator(backbone, MeanFlow(), encoder, shape=shape), x, raw_cond)
    # MeanFlow with jvp_rows="jump" (JVP on the r != t rows) and "all" (one JVP over the batch;
    # the default "auto" is one of the two, marked in the rows), each through both JVP backends: forward-mode dual tensors (the default) and
    # torch.func.jvp (the "_functorch" rows), so the backend's saving is measured in the same run
    for label, obj, backend in (("flow_matching", FlowMatching(), "forward_ad"),
                                ("meanflow_jump", MeanFlow(jvp_rows="jump"), "forward_ad"),
                                ("meanflow_jvp_all", MeanFlow(jvp_rows="all"), "forward_ad"),
                                ("meanflow_jump_functorch", MeanFlow(jvp_rows="jump"), "functorch"),
                                ("meanflow_jvp_all_functorch", MeanFlow(jvp_rows="all"), "functorch")):
        gen = Generator(backbone, obj, encoder, shape=shape)
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95))

        def step(gen=gen, opt=opt, backend=backend):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(draw_seed)
            with jvp_backend(backend):
                gen.compute_loss({"x": x, "cond": raw_cond}).loss.mean().backward()
            opt.step()
        cases[("train_step", label)] = step

    # all cases alternate within each repetition, so that they see the same machine load
    # at least `repeats` rounds and `min_seconds` of measurement: fast cases get many rounds
    # wall time and the process's CPU time (on a shared machine the CPU time excludes the
    # time the process waits for a core, so it is the steadier measure of cost)
    times = {k: [] for k in cases}
    cpu_times = {k: [] for k in cases}
    i, began = 0, time.perf_counter()
    while i < warmup + repeats or time.perf_counter() - began < min_seconds:
        for k, fn in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
                cpu_times[k].append(time.process_time() - cpu_start)
        i += 1
    rows = [base(case, objective, times[(case, objective)], cpu_times[(case, objective)])
            for (case, objective) in times]
    default_rows = "jvp_all" if MeanFlow().whole_batch_jvp(x.numel()) else "jump"   # the default's choice
    fm = ("train_step", "flow_matching")
    for row in rows:
        if (row["objective"] or "").startswith("meanflow"):
            mf = ("train_step", row["objective"])
            row["jvp_rows"] = batch if "jvp_all" in row["objective"] else jvp_rows
            row["jvp_backend"] = "functorch" if row["objective"].endswith("_functorch") else "forward_ad"
            row["default"] = row["objective"] == f"meanflow_{default_rows}"   # MeanFlow() as configured
            row["vs_flow_matching"] = min(cpu_times[mf]) / min(cpu_times[fm])
            row["vs_flow_matching_wall"] = min(times[mf]) / min(times[fm])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (min and median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=30.0,
                        help="keep repeating a backbone's cases until this much time has passed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: reproducible on a shared machine; 0 = torch's default)")
    parser.add_argument("--debug", action="store_true", help="tiny models, 1 repeat; writes backbones_debug.json")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cases = DEBUG_CASES if args.debug else CASES
    repeats, warmup = (1, 1) if args.debug else (args.repeats, args.warmup)
    rows = []
    for name, shape, condition, batch, overrides in cases:
        rows += bench_case(name, shape, condition, overrides, batch or args.batch, repeats, warmup,
                           0.0 if args.debug else args.min_seconds)
        print(f"done {name} {shape} batch {batch or args.batch}", flush=True)
    ratios = {f'{r["backbone"]} {r["input"]} batch {r["batch"]} ({r["objective"]}'
              f'{", the default" if r["default"] else ""})': r["vs_flow_matching"]
              for r in rows if "vs_flow_matching" in r}
    config = {"batch": args.batch, "load_avg_1min_at_end": os.getloadavg()[0], "repeats": repeats, "warmup": warmup, "dtype": "float32", "threads": torch.get_num_threads(),
              "estimator": ("sec_per_step = min wall time over repeats (sec_median also given), cpu_sec_per_step = "
                            "min process CPU time; vs_flow_matching = ratio of CPU times (vs_flow_matching_wall: "
                            "of wall times); all cases of a backbone interleaved"),
              "min_seconds": args.min_seconds,
              "device": "cpu", "cases": [[c[0], list(c[1]), list(c[2]), c[3] or args.batch, c[4]] for c in cases],
              "train_step": "AdamW step of Generator.compute_loss (default FlowMatching / MeanFlow hyper-parameters)",
              "target_meanflow_over_flow_matching": TARGET_RATIO}
    write_results("backbones_debug" if args.debug else "backbones", config, rows)
    for name, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(f"{name}: MeanFlow step / Flow Matching step = {ratio:.2f}x in CPU time "
              f"({verdict} the {TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
