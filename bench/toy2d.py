"""2-D benchmark of every objective through the one trainer.

Same backbone (MLP), data, batch and number of steps for every objective; samples at
several NFE are scored by sliced W2 and MMD against a held-out sample of the same toy.

    python -m bench.toy2d [--dataset checkerboard] [--steps 3000] [--objectives meanflow,drifting]
    python -m bench.toy2d --objectives sct --override objective.tangent_warmup_steps=0 --variant warmup0

The distillation objectives (``distill_consistency``, ``distill_ayf``) need a teacher: the bench
trains one Flow Matching run (same data, backbone and steps; the ``flow_matching`` run itself when it
is in ``--objectives``) and passes its run directory as ``objective.teacher``, or takes an existing
one from ``--teacher``. Their rows record ``teacher`` and ``teacher_steps``.

Writes ``bench/results/toy2d.json`` (rows of other datasets and objectives are kept, re-read just
before writing; a row is replaced by a run of the same dataset, objective and ``--variant``, so
that a variant's rows sit beside the shipped config's) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from bench.common import RESULTS, load_rows, write_results
from jumpflow.trainer import train

# objective -> (config overrides, NFEs evaluated)
PLAN = {
    "flow_matching": ([], [1, 2, 4, 100]),
    "meanflow": ([], [1, 2, 4]),
    "tvm": ([], [1, 2, 4]),
    "transition_matching": (["objective.transition_steps=4"], [4]),
    "drifting": (["objective.gen_per_group=null"], [1]),
    "ddpm": (["objective.inference.sampler=ddpm", "objective.clip_sample=null"], [1, 10, 100]),   # ancestral DDPM
    "regression": ([], [1]),
    "shortcut": ([], [1, 2, 4]),
    "consistency": ([], [1, 2]),
    "sct": ([], [1]),
    "alpha_flow": ([], [1, 2]),
    "improved_meanflow": ([], [1, 2]),
    "ect": ([], [1, 2]),
    "distill_consistency": ([], [1, 2]),
    "distill_ayf": ([], [1, 2, 4]),
    "transition_matching_ar": (["objective.transition_steps=4"], [4]),
}
#: objectives trained from a frozen Flow Matching teacher (``objective.teacher=<run_dir>``)
NEEDS_TEACHER = ("distill_consistency", "distill_ayf")


def run_one(objective: str, dataset: str, steps: int, batch: int, seed: int, out_dir: Path,
            teacher: Path | None = None, extra_overrides: tuple[str, ...] = (), variant: str = "") -> list[dict]:
    overrides, nfes = PLAN[objective]
    overrides = [*overrides, *extra_overrides]
    extra = {"variant": variant, "variant_overrides": list(extra_overrides)} if variant else {}
    if objective in NEEDS_TEACHER:
        if teacher is None:
            raise ValueError(f"{objective} needs a teacher run directory")
        overrides = [*overrides, f"objective.teacher={teacher}"]
        extra.update(teacher="flow_matching", teacher_steps=_steps_of(teacher))
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            f"objective={objective}", "backbone=mlp", "task=toy2d", f"task.dataset={dataset}",
            f"task.eval_steps=[{','.join(map(str, nfes))}]", "task.eval_samples=4000",
            f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", "trainer.eval_every=0",
            f"trainer.ckpt_every={steps}", "trainer.progress=false", "trainer.log_every=100",
            "optim.lr=1e-3", "optim.warmup_steps=100", "ema.decay=0.999", "logger=none",
            f"seed={seed}", f"run_dir={out_dir / objective}", *overrides])
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    rates = [json.loads(line).get("train/it_per_s") for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r for r in rates if r]
    sec_per_step = 1.0 / (sum(rates) / len(rates)) if rates else wall / steps
    m = {k.split("/", 1)[-1]: v for k, v in result["metrics"].items()}   # the trainer prefixes "eval/"
    return [{"dataset": dataset, "objective": objective, "nfe": nfe, "sliced_w2": m.get(f"sliced_w2_nfe{nfe}"),
             "mmd": m.get(f"mmd_nfe{nfe}"), "sec_per_step": sec_per_step, "train_steps": steps, "seed": seed, **extra}
            for nfe in nfes]


def _steps_of(run_dir: Path) -> int:
    from jumpflow.checkpoint import read_checkpoint, resolve_checkpoint

    return int(read_checkpoint(resolve_checkpoint(run_dir))[1]["step"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="checkerboard")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objectives", default=",".join(PLAN))
    ap.add_argument("--teacher", default=None,
                    help="a trained flow_matching run directory for the distillation objectives "
                         "(default: train one here, same data / backbone / steps)")
    ap.add_argument("--override", action="append", default=[],
                    help="extra hydra override of every run here (e.g. objective.tangent_warmup_steps=0); needs --variant")
    ap.add_argument("--out", default=str(RESULTS / "toy2d.json"), help="result file (rows merged)")
    ap.add_argument("--variant", default="", help="label of the rows of a run with --override (kept apart)")
    args = ap.parse_args(argv)
    if args.override and not args.variant:
        ap.error("--override needs --variant (a label that keeps these rows apart from the shipped config's)")
    objectives = args.objectives.split(",")
    unknown = [o for o in objectives if o not in PLAN]
    if unknown:
        ap.error(f"unknown objectives {unknown}; valid: {', '.join(PLAN)}")
    if "flow_matching" in objectives:                      # its run is the teacher: train it first
        objectives = ["flow_matching"] + [o for o in objectives if o != "flow_matching"]
    rows = []
    teacher = Path(args.teacher) if args.teacher else None
    with tempfile.TemporaryDirectory() as tmp:
        for objective in objectives:
            if objective in NEEDS_TEACHER and teacher is None:
                print("training the flow_matching teacher", flush=True)
                run_one("flow_matching", args.dataset, args.steps, args.batch, args.seed, Path(tmp) / "teacher")
                teacher = Path(tmp) / "teacher" / "flow_matching"
            rows += run_one(objective, args.dataset, args.steps, args.batch, args.seed, Path(tmp), teacher,
                            tuple(args.override), args.variant)
            if objective == "flow_matching" and teacher is None:
                teacher = Path(tmp) / "flow_matching"
            print(rows[-1], flush=True)
    done = [r for r in load_rows(Path(args.out))         # re-read: other runs may have written
            if not (r["dataset"] == args.dataset and r["objective"] in objectives
                    and r.get("variant", "") == args.variant)]
    write_results("toy2d", {"dataset": args.dataset, "steps": args.steps, "batch": args.batch, "backbone": "MLP",
                            "lr": 1e-3, "ema": 0.999, "eval_samples": 4000,
                            "note": "transition_matching(_ar) nfe = backbone evaluations (T=4), each with 8 head "
                                    "steps (per token for _ar); distill_* rows distil a flow_matching teacher "
                                    "trained at the same budget (teacher_steps); rows of other runs (datasets, "
                                    "objectives) are kept"},
                  done + rows, Path(args.out))


if __name__ == "__main__":
    main()
