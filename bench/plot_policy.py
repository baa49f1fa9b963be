"""Plots of the policy benchmark (``bench/results/policy.json``): rollout behaviour-mode
frequencies per objective against the demos' on a multimodal task, success against NFE, and
(for rows run with Diffusion Policy's protocol) success against the training step of each
evaluated checkpoint: whether a row has stopped improving or was cut short by the budget.

    python -m bench.plot_policy --task block_push_lowdim
    python -m bench.plot_policy --task reach_around_lowdim
    python -m bench.plot_policy --task block_push_lowdim --variant h2-24000
    python -m bench.plot_policy --task block_push_lowdim --variant h2-24000 --also h2-24000-p05

Writes ``bench/results/policy_modes_<task>.png``, ``policy_nfe_<task>.png`` and, where rows
have ``checkpoint_successes``, ``policy_checkpoints_<task>.png`` (atomically) and prints the
numbers it plotted. ``--variant V`` draws only the rows of config variant ``V`` and writes
``..._<task>_<V>.png``, so that the plots of two budgets or recipes of one task stand side by side;
``--also W`` (repeatable) draws the rows of variant ``W`` into ``V``'s plots too (a recipe change
run on the same budget, e.g. one objective's hyper-parameter), labelled by their variant."""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from bench.common import RESULTS, load_rows, print_table
from jumpflow.io import atomic_write


def mode_rows(rows: list[dict], task: str, demo: dict[str, float] | None = None
              ) -> tuple[list[str], dict[str, dict[str, float]], dict[str, float]]:
    """Per variant (``objective-sampler-nfe``): the rollout mode frequencies averaged over seeds
    (``mode_freq/<m>`` of the last checkpoint), and the demos' frequencies."""
    freqs: dict[str, list[dict]] = defaultdict(list)
    demo = dict(demo or {})
    for r in rows:
        if r["task"] != task or "mode_entropy_ratio" not in r:
            continue
        freqs[label_of(r)].append({k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("mode_freq/")})
    modes = sorted({m for fs in freqs.values() for f in fs for m in f} | set(demo))
    mean = {lab: {m: float(np.mean([f.get(m, 0.0) for f in fs])) for m in modes} for lab, fs in freqs.items()}
    return modes, mean, demo


def plot_path(kind: str, task: str, variant: str | None = None):
    """``RESULTS / policy_<kind>_<task>[_<variant>].png``."""
    return RESULTS / f"policy_{kind}_{task}{'_' + variant if variant else ''}.png"


def of_variant(rows: list[dict], variant: str | None, also: tuple[str, ...] = ()) -> list[dict]:
    """The rows of config ``variant`` or of one of ``also`` (all rows when ``variant`` is ``None``)."""
    return rows if variant is None else [r for r in rows if r.get("variant") in (variant, *also)]


def plot_modes(rows: list[dict], task: str, demo: dict[str, float] | None = None, variant: str | None = None,
               also: tuple[str, ...] = ()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, mean, demo = mode_rows(of_variant(rows, variant, also), task, demo)
    if not mean:
        raise SystemExit(f"no rows with mode metrics for {task} in {RESULTS / 'policy.json'}")
    labels = (["demos"] if demo else []) + sorted(mean)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(labels), 3.6))
    bottom = np.zeros(len(labels))
    for m in modes:
        vals = np.array(([demo.get(m, 0.0)] if demo else []) + [mean[lab][m] for lab in sorted(mean)])
        ax.bar(labels, vals, bottom=bottom, label=m)
        bottom += vals
    ax.set_ylabel("share of episodes")
    # two lines: one line is wider than a figure of few bars and tight_layout cuts it at the left
    ax.set_title(f"{task}\nbehaviour modes of rollouts (mean over seeds) vs demos", fontsize=9)
    # outside the axes: every bar reaches 1.0, so any legend inside covers one
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mode", title_fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    path = plot_path("modes", task, variant)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    print_table([{"variant": lab, **{m: round(v, 3) for m, v in mean[lab].items()}} for lab in sorted(mean)])
    return path


def plot_nfe(rows: list[dict], task: str, variant: str | None = None, also: tuple[str, ...] = ()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in of_variant(rows, variant, also):
        if r["task"] == task:
            name = r["objective"] if r["sampler"] in (r["objective"], None) else f"{r['objective']} ({r['sampler']})"
            name += f" [{r['variant']}]" if r.get("variant") else ""
            curves[name][int(r["nfe"])].append(float(r.get("success_last_mean", r["success_rate"])))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for index, (name, pts) in enumerate(sorted(curves.items())):
        nfes = sorted(pts)
        ax.plot(nfes, [np.mean(pts[n]) for n in nfes], label=name, **curve_style(index))
    ax.set_xscale("log")
    ax.set_xlabel("NFE per action chunk")
    ax.set_ylabel("success (mean over seeds)")
    ax.set_title(f"{task}: success against NFE")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))    # beside: the 1-NFE points sit low
    fig.tight_layout()
    path = plot_path("nfe", task, variant)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    return path


MARKERS = "osD^vPX*<>"


def curve_style(index: int) -> dict:
    """Matplotlib style of the ``index``-th curve of a plot: colour, marker and line style all
    change, so that more curves than one palette's ten colours stay apart."""
    return {"color": f"C{index % 10}", "marker": MARKERS[index % len(MARKERS)],
            "linestyle": ("-", "--", ":")[(index // 10) % 3]}


def label_of(row: dict) -> str:
    """``objective-nfe`` (or ``sampler-nfe`` for another sampler of the objective, e.g. ``ddim-10``),
    `` (variant)`` appended when the row has one."""
    label = f"{row['objective']}-{row['nfe']}" if row["sampler"] in (row["objective"], None) else f"{row['sampler']}-{row['nfe']}"
    return label + (f" ({row['variant']})" if row.get("variant") else "")


def checkpoint_curves(rows: list[dict], task: str, variant: str | None = None, also: tuple[str, ...] = ()
                      ) -> dict[str, dict[int, tuple[float, int]]]:
    """Per variant label, per training step: ``(mean success over the seeds evaluated at that
    step, number of seeds)``, from the DP-protocol rows' ``checkpoint_steps`` /
    ``checkpoint_successes``; only rows of config ``variant`` (or of ``also``) when one is given. Rows without
    them (final-checkpoint-only runs) are left out."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in of_variant(rows, variant, also):
        if r["task"] != task or "checkpoint_successes" not in r:
            continue
        steps, succ = r["checkpoint_steps"], r["checkpoint_successes"]
        if len(steps) != len(succ):
            raise ValueError(f"{task} {label_of(r)} seed {r['seed']}: {len(steps)} checkpoint steps but "
                             f"{len(succ)} successes")
        for step, s in zip(steps, succ):
            acc[label_of(r)][int(step)].append(float(s))
    return {lab: {st: (float(np.mean(v)), len(v)) for st, v in sorted(pts.items())} for lab, pts in acc.items()}


def legend_label(label: str, points: dict[int, tuple[float, int]]) -> str:
    """``label`` with the seed count of its curve, ``n=3``, or ``n=1-3`` where fewer seeds reached
    some checkpoints, so a one-seed curve is not read as a three-seed mean."""
    counts = sorted({n for _, n in points.values()})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{label}, n={n}"


def plot_checkpoints(rows: list[dict], task: str, variant: str | None = None, also: tuple[str, ...] = ()):
    """Success against training step (mean over seeds) per variant (of config ``variant`` only,
    when given); ``None`` when no such row of ``task`` has per-checkpoint results."""
    curves = checkpoint_curves(rows, task, variant, also)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for index, (lab, pts) in enumerate(sorted(curves.items())):
        ax.plot(list(pts), [m for m, _ in pts.values()], label=legend_label(lab, pts), **curve_style(index))
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("success (mean over seeds)")
    ax.set_title(f"{task}: success of the last checkpoints (DP protocol)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(curves) <= 16 else 2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plot_path("checkpoints", task, variant)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    print_table([{"variant": lab, **{str(st): f"{m:.2f}" for st, (m, _) in pts.items()},
                  "seeds": max(n for _, n in pts.values())} for lab, pts in sorted(curves.items())])
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="block_push_lowdim")
    ap.add_argument("--demos", default=None, help="the task's HDF5 (its demos' mode frequencies are drawn too)")
    ap.add_argument("--variant", default=None,
                    help="only rows of this config variant (e.g. h2-24000), in plots named ..._<task>_<variant>.png")
    ap.add_argument("--also", action="append", default=[], metavar="VARIANT",
                    help="with --variant: draw this variant's rows into the same plots too (repeatable)")
    args = ap.parse_args(argv)
    rows = load_rows(RESULTS / "policy.json")
    if args.also and args.variant is None:
        ap.error("--also needs --variant (the plots are named after --variant)")
    known = sorted({r["variant"] for r in rows if r["task"] == args.task and r.get("variant")})
    for flag, name in [("--variant", args.variant)] * (args.variant is not None) + [("--also", a) for a in args.also]:
        if name not in known:
            ap.error(f"{flag}: {name!r} has no rows of {args.task} in {RESULTS / 'policy.json'}; "
                     f"valid: {', '.join(known) or 'none'}")
    also = tuple(args.also)
    demo = None
    if args.demos:
        from jumpflow.eval.modes import mode_distribution, read_demo_modes
        demo = mode_distribution(read_demo_modes(args.demos))
    print(plot_modes(rows, args.task, demo, args.variant, also))
    print(plot_nfe(rows, args.task, args.variant, also))
    try:
        checkpoints = plot_checkpoints(rows, args.task, args.variant, also)
    except ValueError as e:                                        # a malformed row: name the file
        raise SystemExit(f"{RESULTS / 'policy.json'}: {e}") from None
    if checkpoints is not None:
        print(checkpoints)


if __name__ == "__main__":
    main()
