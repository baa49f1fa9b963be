"""Fold ``bench/results/policy.json`` rows written elsewhere into the repository's file.

Policy benchmarks run for hours, so they run in parallel lanes, each from its own installed copy
of the tree with its own copy of ``bench/results/policy.json`` (``bench.policy`` writes where it
runs). This merges those side files back by row key (task, objective, variant, sampler, NFE,
seed): a side row replaces the row of the same key, or is added; every other row stays.

    python -m bench.merge_policy_rows LANE1/bench/results/policy.json LANE2/... \\
        [--select can_lowdim_mh:ddpm:dp:*] [--into bench/results/policy.json] [--dry-run]

``--select TASK:OBJECTIVE[:VARIANT[:SEED]]`` (repeatable; ``*`` matches anything, variant ``none``
the rows without one) keeps only the side rows it names: a lane's file also holds every row it
was copied with. Later side files win over earlier ones. Every file is read and checked before
anything is written (one line naming the file and the missing key), the write is atomic, and
``policy.md`` beside the target is rewritten from the merged rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, machine, print_table, row_key
from jumpflow.io import atomic_write_text

#: the fields every merged row must have: its key (``bench.common.row_key``) and what ``policy.md``'s
#: seed summary reads
KEY_FIELDS = ("task", "objective", "sampler", "nfe", "seed", "train_steps")


def read_policy_file(path: Path) -> dict:
    """The ``{"bench": "policy", ..., "rows"}`` document at ``path``; ``SystemExit`` with one line
    naming the file (and the row and key) when it is missing, not JSON, another bench's, or holds a
    row without a key field."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise SystemExit(f"{path}: no 'rows' list (not a bench result file)")
    if doc.get("bench") != "policy":
        raise SystemExit(f"{path}: bench is {doc.get('bench')!r}, not 'policy'")
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in KEY_FIELDS if k not in row]
        if missing:
            raise SystemExit(f"{path}: row {i} has no {missing[0]!r}")
    return doc


def parse_select(spec: str) -> tuple[str, ...]:
    """``TASK:OBJECTIVE[:VARIANT[:SEED]]`` -> a 4-tuple padded with ``*``."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4 or not all(parts):
        raise SystemExit(f"--select {spec!r}: expected TASK:OBJECTIVE[:VARIANT[:SEED]] (* for any)")
    if len(parts) == 4 and parts[3] != "*" and not parts[3].isdigit():
        raise SystemExit(f"--select {spec!r}: the seed must be an integer or *")
    return tuple(parts + ["*"] * (4 - len(parts)))


def selected(row: dict, selects: list[tuple[str, ...]]) -> bool:
    """Whether ``row`` matches one of ``selects`` (all rows when there are none)."""
    if not selects:
        return True
    fields = (row["task"], row["objective"], row.get("variant") or "none", str(row["seed"]))
    return any(all(s in ("*", f) for s, f in zip(sel, fields)) for sel in selects)


def merge(target_rows: list[dict], side_rows: list[dict]) -> tuple[list[dict], dict[str, int], list[dict]]:
    """``target_rows`` with each of ``side_rows`` replacing the row of its key, or appended (later
    side rows win); the count of rows added, replaced and unchanged (a side row equal to the
    target's); the side rows added or replacing one."""
    incoming: dict[tuple, dict] = {}
    for row in side_rows:
        incoming[row_key(row)] = row
    old = {row_key(r): r for r in target_rows}
    counts, changed = {"added": 0, "replaced": 0, "unchanged": 0}, []
    for key, row in incoming.items():
        how = "added" if key not in old else "unchanged" if old[key] == row else "replaced"
        counts[how] += 1
        if how != "unchanged":
            changed.append(row)
    merged = [incoming.get(row_key(r), r) for r in target_rows]
    merged += [row for key, row in incoming.items() if key not in old]
    return merged, counts, changed


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sides", nargs="+", type=Path, help="policy.json files written by other lanes")
    ap.add_argument("--into", type=Path, default=RESULTS / "policy.json", help="the file merged into")
    ap.add_argument("--select", action="append", default=[], help="TASK:OBJECTIVE[:VARIANT[:SEED]], * for any")
    ap.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    return ap


def main(argv=None) -> dict[str, int]:
    args = parser().parse_args(argv)
    selects = [parse_select(s) for s in args.select]
    # every file checked before anything is written
    target = read_policy_file(args.into) if args.into.exists() else {"bench": "policy", "config": {}, "rows": []}
    sides = [read_policy_file(p) for p in args.sides]
    side_rows = [r for doc in sides for r in doc["rows"] if selected(r, selects)]
    merged, counts, changed = merge(target["rows"], side_rows)
    print(f"{args.into}: {counts['added']} added, {counts['replaced']} replaced, "
          f"{counts['unchanged']} unchanged, from {len(side_rows)} selected side rows")
    print_table([{k: r.get(k) for k in ("task", "objective", "variant", "sampler", "nfe", "seed", "success_rate",
                                        "success_max", "success_last_mean")} for r in changed])
    if args.dry_run or counts["added"] + counts["replaced"] == 0:
        return counts
    from bench.policy import write_markdown  # torch and hydra: only when there is something to write

    doc = {"bench": "policy", "machine": target.get("machine", machine()), "config": target.get("config", {}),
           "rows": merged}
    # the markdown first: if it cannot be built, neither file changes
    write_markdown(merged, args.into.with_suffix(".md"))
    atomic_write_text(args.into, json.dumps(doc, indent=2))
    print(f"wrote {args.into} and {args.into.with_suffix('.md')}")
    return counts


if __name__ == "__main__":
    main()
