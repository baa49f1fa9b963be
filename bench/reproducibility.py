"""Reproducibility of a policy benchmark row: what a row may and may not depend on.

A row of ``bench/results/policy.json`` is a function of (task, objective, config variant, seed,
steps, protocol, episodes). Two things it must *not* depend on, each checked here on one small
run of the policy bench's own recipe (``bench.policy.run_overrides``), with a control that must
come out different, so that each check can fail:

1. **The checkpoint schedule.** ``--protocol dp`` checkpoints every tenth of training and keeps
   five; ``--protocol last`` checkpoints at the end only. Both must end in the same tensors
   (model, EMA, optimizer state, torch RNG state; max |difference| per group). Control: the
   next training seed, whose EMA weights must end elsewhere.
2. **What the process evaluated before.** Under DP's protocol the last checkpoint is rolled out
   after the earlier ones (and DDPM-100 before DDIM-10); under ``--protocol last`` it is rolled out
   first. With the policy's noise seeded per batch of test episodes (``bench.policy.POLICY_SEED``)
   both orders must give the same episodes (success and length of each). Control: the same two
   orders with unseeded noise (torch's global generator, as rows written before 2026-12-07 drew it),
   reported as observed: it may or may not change episodes, so it is not a pass/fail check.

    python -m bench.reproducibility                          # Reach Around, DDPM (DDIM-10), 300 steps
    python -m bench.reproducibility --objective meanflow --nfe 1 --steps 200

Rows: check, what the two runs differ in, expected (identical / different), the figure compared
(max |weight difference|, or episodes whose success or length differ), and ``ok``. The exit
status is 1 when a check's outcome is not the expected one. Run directories go to a temporary
folder that is removed at the end (``--runs`` keeps them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_module

from bench.common import arg_parser, parse_args, write_results
from bench.policy import POLICY_SEED, VARIANTS, run_evaluator, run_overrides
from jumpflow.checkpoint import checkpoint_paths, load_model, read_checkpoint
from jumpflow.trainer import train


def train_run(task: str, objective: str, seed: int, steps: int, protocol: str, run_dir: Path,
              overrides: list[str]) -> list[Path]:
    """Train one run exactly as ``bench.policy`` would under ``protocol``; its checkpoints, oldest first."""
    args = SimpleNamespace(style="ph", override=list(overrides), steps=steps, protocol=protocol)
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[*run_overrides(args, task, objective, seed, run_dir),
                                          "trainer.cpu_threads=1"])
    result = train(cfg)
    return checkpoint_paths(Path(result["run_dir"]) / "checkpoints")


def max_tensor_difference(ckpt_a: Path, ckpt_b: Path) -> dict[str, float]:
    """Max |a - b| per group of the tensors two checkpoints hold (``model``, ``ema``, ``optim``,
    ``rng``: the part of each name before its first dot); ``inf`` for a group whose names, shapes
    or dtypes differ."""
    a, _ = read_checkpoint(ckpt_a)
    b, _ = read_checkpoint(ckpt_b)
    worst: dict[str, float] = {}
    for name in sorted(a.keys() | b.keys()):
        group = name.split(".", 1)[0]
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            diff = float("inf")
        else:
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        worst[group] = max(worst.get(group, 0.0), diff)
    return worst


def rollouts(ckpt: Path, episodes: int, nfe: int, sampler: str | None, policy_seed: int | None,
             first: Path | None = None) -> list[tuple[bool, int]]:
    """``(success, length)`` of each test episode of ``ckpt``'s EMA policy at ``nfe``; when ``first``
    is given its checkpoint is rolled out before, in the same process. As in ``bench.policy``, every
    checkpoint is loaded before any is rolled out (building a model seeds torch's generator, so a
    load between two evaluations would hide what the first one drew)."""
    models = [load_model(path)[0] for path in ([first] if first is not None else []) + [ckpt]]
    out = None
    for model in models:
        model.set_inference({"steps": nfe, "sampler": sampler})
        ev = run_evaluator(model, episodes, None, policy_seed=policy_seed, n_videos=0)
        out = [(bool(e["success"]), int(e["length"])) for e in ev["episodes"]]
    return out


def weights(diff: dict[str, float]) -> float:
    """The policy's weights' difference: the EMA's where the run keeps one, else the model's."""
    return diff.get("ema", diff.get("model", 0.0))


def differing(a: list[tuple[bool, int]], b: list[tuple[bool, int]]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--task", default="reach_around_lowdim")
    ap.add_argument("--objective", default="ddpm", choices=sorted(VARIANTS))
    ap.add_argument("--nfe", type=int, default=10, help="sampling steps of the rollouts")
    ap.add_argument("--sampler", default="ddim", help="the objective's sampler (ddpm: ddpm or ddim; others: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--override", action="append", default=[], help="extra hydra override (repeatable)")
    ap.add_argument("--runs", default=None, help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--tag", default="reproducibility", help="result file bench/results/<tag>.json")
    args = parse_args(ap, argv)
    if args.steps < 10:
        ap.error(f"--steps: at least 10 (the DP schedule checkpoints every tenth), got {args.steps}")
    if args.episodes < 1 or args.nfe < 1:
        ap.error("--episodes and --nfe: at least 1")
    sampler = None if args.sampler.lower() == "none" or args.objective != "ddpm" else args.sampler

    with tempfile.TemporaryDirectory(prefix="jumpflow_repro_") as scratch:
        root = Path(args.runs) if args.runs else Path(scratch)
        name = f"{args.task}_{args.objective}"
        dp = train_run(args.task, args.objective, args.seed, args.steps, "dp", root / f"{name}_dp_s{args.seed}",
                       args.override)
        last = train_run(args.task, args.objective, args.seed, args.steps, "last",
                         root / f"{name}_last_s{args.seed}", args.override)
        other = train_run(args.task, args.objective, args.seed + 1, args.steps, "last",
                          root / f"{name}_last_s{args.seed + 1}", args.override)
        same_diff = max_tensor_difference(dp[-1], last[-1])
        seed_diff = max_tensor_difference(dp[-1], other[-1])

        evaluate = {"episodes": args.episodes, "nfe": args.nfe, "sampler": sampler}
        seeded_alone = rollouts(last[-1], policy_seed=POLICY_SEED, **evaluate)
        seeded_after = rollouts(dp[-1], policy_seed=POLICY_SEED, first=dp[-2], **evaluate)
        free_alone = rollouts(last[-1], policy_seed=None, **evaluate)
        free_after = rollouts(dp[-1], policy_seed=None, first=dp[-2], **evaluate)

    setting = f"{args.task} {args.objective} seed {args.seed}, {args.steps} steps"
    rows = [
        {"check": "checkpoint schedule", "runs": f"{setting}: dp schedule ({len(dp)} kept) vs last",
         "expected": "identical", "figure": "max |tensor diff|", "value": max(same_diff.values()),
         **{f"diff_{g}": d for g, d in same_diff.items()}, "ok": max(same_diff.values()) == 0.0},
        {"check": "control: training seed", "runs": f"seed {args.seed} vs {args.seed + 1}",
         "expected": "different", "figure": "max |weight diff|", "value": weights(seed_diff),
         **{f"diff_{g}": d for g, d in seed_diff.items()}, "ok": weights(seed_diff) > 0.0},
        {"check": "evaluation order, seeded noise", "runs": f"last checkpoint alone vs after the one before it, "
         f"policy_seed={POLICY_SEED}", "expected": "identical", "figure": "episodes differing",
         "value": differing(seeded_alone, seeded_after), "episodes": args.episodes,
         "success": [sum(s for s, _ in seeded_alone) / args.episodes, sum(s for s, _ in seeded_after) / args.episodes],
         "ok": seeded_alone == seeded_after},
        {"check": "control: evaluation order, unseeded noise", "runs": "the same two orders, policy_seed=None",
         "expected": "observed", "figure": "episodes differing", "value": differing(free_alone, free_after),
         "episodes": args.episodes,
         "success": [sum(s for s, _ in free_alone) / args.episodes, sum(s for s, _ in free_after) / args.episodes],
         "ok": None},
    ]
    config = {"task": args.task, "objective": args.objective, "nfe": args.nfe, "sampler": sampler,
              "seed": args.seed, "steps": args.steps, "episodes": args.episodes, "overrides": args.override,
              "policy_seed": POLICY_SEED, "threads": torch.get_num_threads()}
    write_results(args.tag, config, rows)
    failed = [r["check"] for r in rows if r["ok"] is False]
    if failed:
        print(f"not reproducible: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
