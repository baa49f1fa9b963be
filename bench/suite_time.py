"""Wall time of the default test suite (the README's test command), whole and restricted to the
tests that already existed at a baseline revision, so that a suite that has grown can still be
compared with the time it once took.

The baseline selection keeps every current test (all its parametrizations) whose file and
function name both appear in ``tests/`` at ``--baseline`` (default: the commit the architecture
issue was filed against, when the suite had 336 tests and took about 2 minutes on 2 cores)::

    python -m bench.suite_time                 # baseline tests, then the whole suite
    python -m bench.suite_time --only baseline

Rows go to ``bench/results/suite_time.json`` with the 1-minute load average before and after:
time it on an otherwise idle machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, arg_parser, load_rows, parse_args, write_results

REPO = Path(__file__).resolve().parents[1]
#: the commit issue 13 ("one house for the code") was filed against
BASELINE = "1b59c76"


def test_names_at(rev: str) -> set[str]:
    """``{"test_x.py::test_name"}`` for the test functions in ``tests/`` at ``rev``."""
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:tests"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    names = set()
    for name in files:
        if name.startswith("test_") and name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:tests/{name}"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout
            names.update(f"{name}::{fn}" for fn in re.findall(r"^def (test_\w+)", text, flags=re.MULTILINE))
    return names


def select(node_ids: list[str], names: set[str]) -> list[str]:
    """The node ids (``tests/test_x.py::test_name[param]``) whose file and function are in ``names``."""
    return [n for n in node_ids if f"{Path(n.split('::')[0]).name}::{n.split('::')[1].split('[')[0]}" in names]


def collect() -> list[str]:
    """The default suite's node ids (one process: collection only)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def timed_pytest(node_ids: list[str]) -> dict:
    """Run the README's test command on ``node_ids`` (all when empty): wall time and pytest's summary."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *node_ids], cwd=REPO, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"wall_seconds": wall, "returncode": proc.returncode, "summary": summary,
            "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0]}


def main(argv=None) -> None:
    ap = arg_parser(__doc__, threads=None)
    ap.add_argument("--baseline", default=BASELINE, help="git revision whose test functions make the baseline set")
    ap.add_argument("--only", choices=("baseline", "full"), default=None)
    ap.add_argument("--tag", default="default", help="row label; rows with the same tag and suite are replaced")
    args = parse_args(ap, argv)
    try:
        baseline_names = test_names_at(args.baseline) if args.only != "full" else set()
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--baseline {args.baseline}: git cannot read tests/ there ({err.stderr.strip()})") from None
    node_ids = collect()
    rows = []
    if args.only != "full":
        chosen = select(node_ids, baseline_names)
        rows.append({"tag": args.tag, "suite": f"tests present at {args.baseline}", "tests": len(chosen),
                     **timed_pytest(chosen)})
        print(rows[-1], flush=True)
    if args.only != "baseline":
        rows.append({"tag": args.tag, "suite": "default", "tests": len(node_ids), **timed_pytest([])})
        print(rows[-1], flush=True)
    keys = {(r["tag"], r["suite"]) for r in rows}
    old = [r for r in load_rows(RESULTS / "suite_time.json")
           if (r["tag"], r["suite"]) not in keys]
    write_results("suite_time", {"command": "python -m pytest (pyproject addopts: -m 'not slow' -n 2)",
                                 "baseline": args.baseline}, old + rows)


if __name__ == "__main__":
    main()
