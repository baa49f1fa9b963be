"""Scripted-expert success rates (Lift, PickPlaceCan, NutAssemblySquare; MetaWorld) over fixed seeds -> bench/results/experts.json.

Usage: ``python -m bench.experts [--style ph|mh] [--n-episodes 100] [--tasks Lift PickPlaceCan] [--seed 0]``
(``--debug``: 3 episodes per task). Episode ``k`` resets with seed ``seed + k`` (the demo
generator's seeds), runs the expert for at most the demo generator's episode cap (ph 400 steps;
mh ``MH_MAX_STEPS``) and counts success. ``--style mh`` runs the human-like style (``MHExpert``,
its draw seeded by the episode seed, exactly as ``jumpflow-demos --style mh`` does), so
``success_rate`` is the fraction of attempts the mh demo generator keeps, and on Lift, Can and Square
``mode_read_back_rate`` the fraction of its successful episodes whose mode, read back from the
states by the evaluator's rule (``jumpflow.envs.grasp_modes``), is the mode the style drew; ``--style dart`` runs the
expert's perturbed execution (``DARTExpert``), the fraction the dart generator keeps. Rows are keyed by
``(task, style)``: a run replaces its own rows and keeps the others.

MetaWorld: ``--tasks metaworld`` runs jumpflow's MetaWorld task set
(``jumpflow.envs.metaworld_env.TASK_SET``, 14 tasks in four difficulty groups), or name v3 tasks
(``--tasks push-v3 reach-v3``); MetaWorld's own scripted policy (``ENV_POLICY_MAP``) acts on
``MetaWorldSim`` reset with seed ``seed + k`` (the demo generator's seeds) for at most MetaWorld's
500 steps; rows carry ``family: "metaworld"`` and the task's ``group`` (style ``ph``: the only one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import load_rows, machine
from jumpflow.checkpoint import atomic_write_text
from jumpflow.envs.experts import STYLES  # ph | mh | dart (a numpy-only module)


def machine_info() -> dict:
    import mujoco
    import robosuite
    info = {**machine(), "mujoco": mujoco.__version__, "robosuite": robosuite.__version__}
    with contextlib.suppress(ImportError):       # MetaWorld not installed: robosuite rows only
        from jumpflow.envs.metaworld_env import metaworld_version
        info["metaworld"] = metaworld_version()
    return info


def episode_stats(run_episode, n_episodes: int, seed: int, on_episode=None) -> dict:
    """``run_episode(seed + k)`` for ``k < n_episodes`` (each the demo generator's own episode, so the
    table measures what the demos are drawn from), ``on_episode(record)`` after each; the fields every
    expert row shares: successes, mean length, the failed seeds, seconds per episode."""
    succ, lengths, failed_seeds = [], [], []
    t0 = time.perf_counter()
    for k in range(n_episodes):
        ep = run_episode(seed + k)
        succ.append(bool(ep["success"]))
        lengths.append(len(ep["actions"]))
        if not ep["success"]:
            failed_seeds.append(seed + k)
        if on_episode is not None:
            on_episode(ep)
    return {"n_episodes": n_episodes, "n_success": int(np.sum(succ)), "success_rate": float(np.mean(succ)),
            "mean_length": float(np.mean(lengths)), "seconds_per_episode": (time.perf_counter() - t0) / n_episodes,
            "seeds": f"{seed}..{seed + n_episodes - 1}", "failed_seeds": failed_seeds}


def run_metaworld_task(task: str, n_episodes: int, seed: int, noise_std: float = 0.0) -> dict:
    """MetaWorld's scripted policy on ``MetaWorldSim`` (episode ``k``: seed ``seed + k``, at most 500 steps)."""
    from jumpflow.envs.metaworld_demos import run_metaworld_episode
    from jumpflow.envs.metaworld_env import MetaWorldExpert, MetaWorldSim, metaworld_env_meta, task_group

    meta = metaworld_env_meta(task)
    max_steps = int(meta["env_kwargs"]["horizon"])
    sim = MetaWorldSim(meta, obs_keys=["state"])
    expert = MetaWorldExpert(meta["env_name"], noise_std=noise_std)
    try:
        stats = episode_stats(lambda s: run_metaworld_episode(sim, expert, s, max_steps), n_episodes, seed)
    finally:
        sim.close()
    return {"task": meta["env_name"], "family": "metaworld", "group": task_group(meta["env_name"]), "style": "ph",
            "noise_std": float(noise_std), "max_steps": max_steps, **stats}


def _expand_tasks(tasks: list[str]) -> list[str]:
    """``metaworld`` -> jumpflow's MetaWorld task set; other names as given."""
    out = []
    for t in tasks:
        if t.lower() == "metaworld":
            from jumpflow.envs.metaworld_env import TASK_SET
            out += list(TASK_SET)
        else:
            out.append(t)
    return out


def run_task(task: str, n_episodes: int, seed: int, style: str = "ph", max_steps: int | None = None) -> dict:
    from jumpflow.envs.demos import episode_cap, run_expert_episode
    from jumpflow.envs.experts import make_expert
    from jumpflow.envs.sim import LOW_DIM_KEYS, RobosuiteSim, canonical_task, default_env_meta

    task = canonical_task(task)
    max_steps = max_steps or episode_cap(task, style)
    sim = RobosuiteSim(default_env_meta(task), obs_keys=LOW_DIM_KEYS)
    expert = make_expert(task, sim.env, style=style)
    modes, counts = {}, {"missed": 0, "regrasps": 0, "read": 0, "read_back": 0}

    def tally(ep):
        attrs = ep.get("attrs", {})
        if style == "mh":
            modes[attrs["mode"]] = modes.get(attrs["mode"], 0) + 1
            counts["missed"] += int(attrs["missed"])
            if sim.tracks_modes and ep["success"]:      # the mode a rollout of this episode would be given
                counts["read"] += 1
                counts["read_back"] += int(sim.current_mode() == attrs["mode"])
        counts["regrasps"] += int(attrs.get("n_regrasps", 0) > 0)

    try:
        # reseeded style draw, dart's perturbed execution
        stats = episode_stats(lambda s: run_expert_episode(sim, expert, s, max_steps), n_episodes, seed, tally)
    finally:
        sim.close()
    n_missed, n_regrasps = counts["missed"], counts["regrasps"]
    row = {"task": task, "style": style, "max_steps": max_steps, **stats}
    if style == "mh":
        row["modes"] = dict(sorted(modes.items()))
        row["n_missed_grasps"] = n_missed
        if counts["read"]:
            row["n_mode_read_back"] = counts["read_back"]
            row["mode_read_back_rate"] = counts["read_back"] / counts["read"]
    if style in ("mh", "dart"):
        row["n_episodes_with_regrasp"] = n_regrasps
    return row


class PerturbedOracle:
    """A planar oracle whose action is perturbed the way a learned policy's might be: Gaussian
    noise of ``noise_std`` (action units) added and clipped to [-1, 1], and the perturbed action
    held for ``hold`` control steps (the oracle is asked again only every ``hold`` steps). The
    noise is drawn from ``np.random.default_rng([seed, 2])`` at each ``reset``."""

    def __init__(self, oracle, noise_std: float = 0.0, hold: int = 1):
        if noise_std < 0 or hold < 1:
            raise ValueError(f"noise_std must be >= 0 and hold >= 1, got {noise_std}, {hold}")
        self.oracle, self.noise_std, self.hold = oracle, float(noise_std), int(hold)

    def __getattr__(self, name):                  # mode, draw: the oracle's
        return getattr(self.oracle, name)

    def reset(self, obs=None, seed=None) -> None:
        self.oracle.reset(obs, seed=seed)
        self.rng = np.random.default_rng([int(np.ravel(seed)[0]) if seed is not None else 0, 2])
        self.t, self.action = 0, None

    def act(self, obs: dict) -> np.ndarray:
        if self.t % self.hold == 0:
            a = self.oracle.act(obs)
            self.action = np.clip(a + self.noise_std * self.rng.standard_normal(a.shape), -1.0, 1.0)
        self.t += 1
        return self.action


def run_planar_task(task: str, n_episodes: int, seed: int, noise_std: float = 0.0, hold: int = 1,
                    oracle_noise: float | None = None) -> dict:
    """A planar oracle (Block Push / Reach Around) over ``n_episodes`` seeds: success (p2 on Block
    Push), p1, the modes it took, the modes it drew. ``noise_std`` / ``hold``: act through
    :class:`PerturbedOracle` (0 / 1: the oracle as the demo generator runs it). ``oracle_noise``:
    the oracle's own demo noise (Block Push; ``None``: its default, 0: the bare feedback law)."""
    from jumpflow.envs.planar_demos import _task_parts, run_oracle_episode
    from jumpflow.envs.registry import planar_env_meta

    name, sim_cls, oracle_cls = _task_parts(task)
    meta = planar_env_meta(name)
    max_steps = int(meta["env_kwargs"]["horizon"])
    sim = sim_cls(meta)
    oracle = oracle_cls(max_delta=sim.max_delta, **({} if oracle_noise is None else {"noise_std": oracle_noise}))
    if noise_std > 0 or hold > 1:
        oracle = PerturbedOracle(oracle, noise_std, hold)
    eps, t0 = [], time.perf_counter()
    try:
        for k in range(n_episodes):
            eps.append(run_oracle_episode(sim, oracle, seed + k, max_steps))
    finally:
        sim.close()
    modes: dict[str, int] = {}
    for ep in eps:
        modes[str(ep["realised_mode"])] = modes.get(str(ep["realised_mode"]), 0) + 1
    return {"task": name, "family": "planar", "style": "oracle", "n_episodes": n_episodes,
            "n_success": sum(ep["success"] for ep in eps), "success_rate": float(np.mean([ep["success"] for ep in eps])),
            "p1_rate": float(np.mean([ep["p1"] for ep in eps])), "max_steps": max_steps,
            "mean_length": float(np.mean([len(ep["actions"]) for ep in eps])), "modes": dict(sorted(modes.items())),
            # how much the action changes from one step to the next (mean |a[t] - a[t-1]|): a law
            # that chatters is hard to clone, whatever its success
            "mean_action_change": float(np.mean([np.abs(np.diff(np.asarray(ep["actions"]), axis=0)).mean()
                                                 for ep in eps])),
            "seconds_per_episode": (time.perf_counter() - t0) / n_episodes, "seeds": f"{seed}..{seed + n_episodes - 1}",
            "failed_seeds": [seed + k for k, ep in enumerate(eps) if not ep["success"]]}


def _key(row: dict) -> tuple[str, str]:
    return row["task"], row.get("style", "ph")      # rows written before styles existed are ph


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["Lift", "PickPlaceCan", "NutAssemblySquare"],
                   help="robosuite tasks, MetaWorld v3 names (push-v3) or 'metaworld' (jumpflow's MetaWorld task set)")
    p.add_argument("--style", default="ph",
                   help="ph (the scripted expert) | mh (human-like, drawn per episode) | dart (ph labels, noisy execution)")
    p.add_argument("--n-episodes", type=int, default=100, help="episodes per task (one value for all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "experts.json"))
    p.add_argument("--debug", action="store_true", help="3 episodes per task")
    p.add_argument("--merge", nargs="*", default=[],
                   help="only merge the rows of these experts JSON files (e.g. a task run separately) into --out")
    args = p.parse_args(argv)
    if args.style not in STYLES:
        print(f"bench.experts: --style must be one of {', '.join(STYLES)}; got {args.style!r}", file=sys.stderr)
        return 2
    n = 3 if args.debug else args.n_episodes
    out = Path(args.out)
    if args.debug and out == Path(p.get_default("out")):
        out = out.with_name("experts_debug.json")          # a smoke run never replaces the real figures
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = load_rows(out)
        for other in args.merge:
            new = load_rows(Path(other))
            keys = {_key(r) for r in new}
            rows = [r for r in rows if _key(r) not in keys] + new
        result = json.loads(Path(args.merge[0]).read_text())
        result["rows"] = rows
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
        args.tasks = []
    rows, merged = [], None
    for task in _expand_tasks(args.tasks):
        from jumpflow.envs.metaworld_env import looks_like_metaworld
        from jumpflow.envs.registry import planar_task_name
        if looks_like_metaworld(task):
            if args.style != "ph":
                print(f"bench.experts: MetaWorld tasks have one style, ph; got --style {args.style}", file=sys.stderr)
                return 2
            rows.append(run_metaworld_task(task, n, args.seed))
        elif planar_task_name(task) is not None:
            rows.append(run_planar_task(task, n, args.seed))
        else:
            rows.append(run_task(task, n, args.seed, args.style))
        r = rows[-1]
        print(f"{r['task']:<18} {r['style']} n={r['n_episodes']:<4} success={r['success_rate']:.3f} "
              f"len={r['mean_length']:.1f} {r['seconds_per_episode']:.2f} s/episode", flush=True)
        # rows of (task, style) pairs not run now are kept from the file as it is now
        try:
            old_rows = load_rows(out)
        except (json.JSONDecodeError, KeyError, OSError):
            old_rows = []
        done = {_key(x) for x in rows}
        merged = [{**x, "style": x.get("style", "ph")} for x in old_rows if _key(x) not in done] + rows
        result = {"bench": "experts", "machine": machine_info(),
                  "config": {"seed": args.seed, "max_steps": "per row (ph 400; mh: jumpflow.envs.demos.MH_MAX_STEPS)",
                             "controller": "OSC_POSE (MetaWorld rows: its mocap hand, 80 Hz, 500 steps)",
                             "control_freq": "20 (MetaWorld rows: 80)",
                             "note": "episode k of a task resets with seed + k (mh: and draws its style from it); "
                                     "n_episodes per row"},
                  "rows": merged}
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")   # after every task: partial runs keep their rows
    if merged is not None:
        rows = merged
    elif args.merge:
        rows = load_rows(out)
    print("\n| task | style | group | n_episodes | success_rate |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r.get('style', 'ph')} | {r.get('group', '')} | {r['n_episodes']} | "
              f"{r['success_rate']:.2f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
