"""Every benchmark script at its smallest setting: does it still run end to end on today's tree?

Each script runs as ``python -m bench.<name> <smallest arguments>`` in a scratch copy of
``bench/`` (so that its results land in the copy's ``bench/results``, never in the committed
ones), with one torch thread, demos generated into a scratch data folder, and a time limit.
Scripts that need a trained run get the run that an earlier step of this list trained (``policy``
trains the runs ``policy_latency``, ``realtime``, ``label_fit`` and ``block_push_probe`` read). Rows: script, the
arguments, return code, seconds and the last line the script printed; the exit status is 1 when
any script failed::

    python -m bench.smoke                    # all (about 20-30 min on one core)
    python -m bench.smoke --only toy2d,jvp_ops

Not run, and why (listed in the result's config): ``suite_time`` runs the whole test suite (its
test selection is unit-tested), ``recipe_sweep`` trains full main-job recipes (``--list`` runs
instead; its configs are composed and validated by the tests). ``code_ab`` compares this tree,
installed once into the scratch folder, with itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, arg_parser, parse_args, write_results

BENCH = Path(__file__).resolve().parent

#: 4 demos, a narrow net and a batch smaller than their windows
TINY_RUN = ["--override", "task.n_demos=4", "--override", "backbone.width=32", "--override", "trainer.batch_size=16"]
#: script -> smallest arguments; ``{work}`` is the scratch folder (runs under ``{work}/runs``)
SMALLEST: dict[str, list[str]] = {
    "jvp_ops": ["--repeats", "2"],
    "drift_kernel": ["--repeats", "1"],
    "drift_floor": [],
    "backbones": ["--debug"],
    "trainer_overhead": ["--steps", "5"],
    "speedups": ["--steps", "5", "--repeats", "1"],
    "numba_layer": ["--steps", "2", "--repeats", "1"],
    "toy2d": ["--steps", "5", "--objectives", "flow_matching,meanflow"],
    "ddp": ["--steps", "4", "--warmup", "1", "--block", "2", "--batch", "16", "--width", "32", "--depth", "1",
            "--objectives", "flow_matching"],
    "experts": ["--tasks", "Lift", "--n-episodes", "1"],
    "oracle_robustness": ["--episodes", "1", "--noise", "0", "--hold", "1"],
    "robot_data": ["--debug", "--workdir", "{work}/robot_data"],
    "profile": ["--steps", "5", "--episodes", "1"],
    # --overwrite: the copied policy.json already holds these rows, which would be skipped
    "policy": ["--tasks", "reach_around_lowdim", "--objectives", "meanflow", "--steps", "5", "--episodes", "1",
               "--runs", "{work}/runs", "--overwrite", *TINY_RUN],
    "policy_latency": ["--tasks", "reach_around_lowdim", "--runs", "{work}/runs", "--calls", "2"],
    "realtime": ["{work}/runs/reach_around_lowdim_meanflow_s0", "--modes", "sync,async", "--delays", "0,1",
                 "--episodes", "1", "--wallclock-episodes", "1", "--roundtrips", "2"],
    "plot_policy": ["--task", "reach_around_lowdim"],
    "reproducibility": ["--steps", "10", "--episodes", "1", "--override", "task.n_demos=4",
                        "--override", "backbone.width=32", "--override", "trainer.batch_size=16"],
    "label_fit": ["--runs", "{work}/runs/block_push_lowdim_regression_s0", "--demos", "1"],
    "block_push_probe": ["probe", "{work}/runs/block_push_lowdim_regression_s0", "--episodes", "1", "--samples", "2"],
    "peer_lerobot": ["--steps", "5", "--episodes", "1", "--eval-envs", "1", "--latency-calls", "2", "--overwrite",
                     "--override", "task.n_demos=4", "--override", "trainer.batch_size=16"],
    "main_job": ["--runs", "{work}/main_job", "--tag", "smoke", "--override", "trainer.max_steps=5",
                 "--override", "task.eval_episodes=1", *TINY_RUN],
    "images": ["--objectives", "flow_matching", "--steps", "5", "--n-fid", "200", "--n-inception", "0",
               "--runs", "{work}/images", "--bench", "images_smoke", "--tag", "s"],
    "recipe_sweep": ["--list"],
    "merge_policy_rows": ["bench/results/policy.json", "--into", "{work}/merged_policy.json",
                          "--select", "reach_around_lowdim:regression"],
    "gpu_checks": ["--device", "cpu", "--only", "env,jvp_attention"],      # the CPU dry run: no GPU in CI
    "code_ab": ["--tree", "a={pkg}", "--tree", "b={pkg}", "--steps", "3", "--repeats", "1", "--tag", "smoke",
                "--override", "experiment=toy2d"],
}
#: a second call after the script's first (e.g. the image bench's merge step)
THEN: dict[str, list[str]] = {
    "images": ["--finalize", "--bench", "images_smoke", "--n-inception", "0", "--runs", "{work}/images"],
    # a Block Push run for label_fit and block_push_probe (their oracle's law is what the policy is compared with)
    "policy": ["--tasks", "block_push_lowdim", "--objectives", "regression", "--steps", "5", "--episodes", "1",
               "--runs", "{work}/runs", "--overwrite", *TINY_RUN],
}
NOT_RUN = {"suite_time": "runs the whole test suite; its test selection is unit-tested",
           "smoke": "this script"}
#: scripts that need a package outside the project's extras: skipped (not failed) without it
OPTIONAL = {"peer_lerobot": "lerobot"}


def scripts_without_setting() -> list[str]:
    """Bench scripts neither in ``SMALLEST`` nor in ``NOT_RUN`` (a new script must be added here)."""
    return sorted(p.stem for p in BENCH.glob("*.py")
                  if p.stem not in SMALLEST and p.stem not in NOT_RUN and p.stem not in ("__init__", "common"))


def run_script(name: str, args: list[str], code_dir: Path, env: dict, timeout: float) -> dict:
    """``python -m bench.<name> *args`` in ``code_dir``: return code, seconds, last printed line."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=code_dir, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        code, out = proc.returncode, (proc.stdout + proc.stderr).strip()
    except subprocess.TimeoutExpired as err:
        code, out = "timeout", str(err)
    lines = [ln for ln in out.splitlines() if ln.strip() and "warn" not in ln.lower()]
    tail = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "") if code else \
        (lines[-1] if lines else "")
    return {"script": name, "args": " ".join(args), "returncode": code, "seconds": round(time.perf_counter() - t0, 1),
            "last_line": tail[-300:]}


def main(argv=None) -> int:
    ap = arg_parser(__doc__, threads=None)
    ap.add_argument("--only", default="", help="comma-separated scripts (default: every script in SMALLEST)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per script")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    args = parse_args(ap, argv)
    names = [n for n in args.only.split(",") if n] or list(SMALLEST)
    unknown = [n for n in names if n not in SMALLEST]
    if unknown:
        raise SystemExit(f"--only: unknown script(s) {', '.join(unknown)}; known: {', '.join(SMALLEST)}")
    missing = scripts_without_setting()
    if missing:
        raise SystemExit(f"bench scripts without a smallest setting here: {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="jumpflow_bench_smoke_"))
    rows = []
    try:
        code_dir = work / "code"
        shutil.copytree(BENCH, code_dir / "bench", ignore=shutil.ignore_patterns("__pycache__"))
        tree = BENCH.parent
        pkg = work / "pkg"
        if "code_ab" in names:                 # code_ab runs installed trees (pip install --target)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pkg), str(tree)],
                           check=True, capture_output=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "JUMPFLOW_DATA": str(work / "data"), "WANDB_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join([str(code_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        for name in names:
            if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
                rows.append({"script": name, "args": "", "returncode": "skipped", "seconds": 0.0,
                             "last_line": f"{OPTIONAL[name]} is not installed (pip install {OPTIONAL[name]})"})
                print(f"{name:18s} skipped: {rows[-1]['last_line']}", flush=True)
                continue
            def fill(argv: list[str]) -> list[str]:
                return [a.replace("{work}", str(work)).replace("{pkg}", str(pkg)) for a in argv]
            rows.append(run_script(name, fill(SMALLEST[name]), code_dir, env, args.timeout))
            if name in THEN and rows[-1]["returncode"] == 0:
                rows.append(run_script(name, fill(THEN[name]), code_dir, env, args.timeout))
            print(f"{rows[-1]['script']:18s} rc={rows[-1]['returncode']} {rows[-1]['seconds']:7.1f} s  "
                  f"{rows[-1]['last_line'][:90]}", flush=True)
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_results("bench_smoke", {"not_run": NOT_RUN, "timeout_s": args.timeout,
                                  "note": "each script in a scratch copy of bench/ (results there), 1 torch thread"},
                  rows, RESULTS / ("bench_smoke.json" if not args.only else "bench_smoke_partial.json"))
    return int(any(r["returncode"] not in (0, "skipped") for r in rows))


if __name__ == "__main__":
    sys.exit(main())
