"""Real-time execution benchmark: what inference delay costs each execution mode, how a policy
keeps a 20 Hz wall clock, and what the policy server adds over loopback.

For every run directory given (a trained policy):

1. ``sync`` / ``async`` / ``ensemble`` / ``rtc`` at simulated delays ``d`` in ``--delays``
   (control periods; ``measured`` for the policy's own wall-clock latency): success rate and
   time to success in control periods, stalls included (``RolloutEvaluator``, the same test
   seeds for every row). ``rtc`` on a policy without prefix conditioning runs ``async``
   (``rtc_fallback`` in the row).
2. ``wallclock``: the policy in the :class:`RealtimeController` at 20 Hz (the env's
   ``control_freq``) on the simulator paced to real time, inference in a background thread
   (``--wallclock-mode``): deadline misses (starved + late ticks), period mean / p95 and jitter.
3. ``server``: ``PolicyServer`` in this process and a client over loopback (openpi's
   ``WebsocketClientPolicy`` when ``openpi-client`` is installed, else a plain websocket client
   with the same codec): round-trip p50 / p95 against the policy's own inference time.

    python -m bench.realtime runs/lift_mf runs/lift_ddpm --episodes 50
    python -m bench.realtime --fake --episodes 1 --max-steps 10 --delays 0,2 --out /tmp/rt.json   # smoke test

Writes ``bench/results/realtime.json`` (``--out``: elsewhere) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, run_recipe, write_results

MODES = ("sync", "async", "ensemble", "rtc")


class HoldPolicy:
    """A stand-in policy for smoke tests (``--fake``): zero actions (the arm holds still), chunks
    of 16 x 7 on Lift's low-dim keys, ``latency_s`` of sleep per call, prefix conditioning."""

    n_obs_steps, n_action_steps, horizon, action_dim = 2, 8, 16, 7
    supports_prefix, prefix_max = True, 8
    inference_steps = 1

    def __init__(self, latency_s: float = 0.002):
        from jumpflow.envs.sim import LOW_DIM_KEYS, default_env_meta

        self.latency_s = latency_s
        self.obs_keys = list(LOW_DIM_KEYS)
        self.env_meta = default_env_meta("Lift")
        self.obs_shapes = {"robot0_eef_pos": (3,), "robot0_eef_quat": (4,), "robot0_gripper_qpos": (2,),
                           "object": (10,)}

    def reset(self):
        pass

    def predict_chunk(self, obs, prefix=None, prefix_len=0):
        import torch
        time.sleep(self.latency_s)
        b = next(iter(obs.values())).shape[0]
        chunk = torch.zeros((b, self.horizon, self.action_dim))
        if prefix is not None:
            chunk[:, self.n_obs_steps - 1:self.n_obs_steps - 1 + prefix_len] = prefix
        return chunk

    def predict_action(self, obs):
        return self.predict_chunk(obs)[:, self.n_obs_steps - 1:self.n_obs_steps - 1 + self.n_action_steps]


def describe(policy, run_dir: str | None) -> dict:
    """``task``, ``objective``, ``nfe``, ``run`` and (a real run) its ``recipe`` of a row."""
    env = (getattr(policy, "env_meta", None) or {}).get("env_name", "?")
    task = getattr(policy, "task", None)
    task_name = getattr(task, "name", None) or env
    objective = getattr(getattr(policy, "objective", None), "name", None) or ("hold" if run_dir is None else "?")
    # the run directory is often scratch space: the row carries how the policy was trained too
    return {"task": task_name, "objective": objective, "nfe": int(getattr(policy, "inference_steps", 1) or 1),
            "run": run_dir or "fake", **({"recipe": run_recipe(run_dir)} if run_dir is not None else {})}


def evaluator_settings(policy, max_steps: int | None) -> dict:
    task = getattr(policy, "task", None)
    return {"env_meta": policy.env_meta, "obs_keys": list(policy.obs_keys), "n_obs_steps": policy.n_obs_steps,
            "n_action_steps": policy.n_action_steps,
            "max_steps": max_steps or int(getattr(task, "eval_max_steps", 400))}


def mode_rows(policy, base: dict, delays: list, modes: list, episodes: int, max_steps: int | None,
              policy_seed: int | None = 0, execute_steps: int | None = None, envs: int = 1) -> list[dict]:
    """One row per (mode, delay); every row runs the same test seeds and, with ``policy_seed``,
    the same policy noise per episode (paired comparisons). ``envs > 1`` runs episodes in
    lock-step batches through spawned workers: one policy call serves the batch (a 100-step
    sampler costs about what it costs for one env), so the rows' latency is per batch call."""
    from jumpflow.eval.rollout import RolloutEvaluator

    rows = []
    ev = RolloutEvaluator(n_episodes=episodes, policy_seed=policy_seed, execute_steps=execute_steps,
                          n_envs=envs, **evaluator_settings(policy, max_steps))
    try:
        for mode in modes:
            for d in delays:
                res = ev.run(policy, mode=mode, delay=d)
                rows.append({**base, "mode": mode, "delay": d, "execute_steps": res["execute_steps"],
                             "success_rate": res["success_rate"],
                             "success_se": float(np.sqrt(res["success_rate"] * (1 - res["success_rate"])
                                                         / max(1, res["n_episodes"]))),
                             "periods_to_success": res["mean_periods_to_success"],
                             "stall_periods": res["mean_stall_periods"], "steps": res["mean_episode_length"],
                             "delay_steps_p50": res["delay_steps_p50"], "latency_ms_p50": res["latency_ms_p50"],
                             "latency_ms_p95": res["latency_ms_p95"], "rtc_fallback": res["rtc_fallback"],
                             "episodes": res["n_episodes"], "env_errors": res["n_env_errors"],
                             "policy_seed": policy_seed, "envs": ev.n_envs})
                print(f"  {mode:8s} d={d}: success {res['success_rate']:.2f}, periods to success "
                      f"{res['mean_periods_to_success']}", flush=True)
    finally:
        ev.close()
    return rows


def wallclock_row(policy, base: dict, episodes: int, max_steps: int | None, mode: str,
                  seed_offset: int, policy_seed: int | None = 0) -> tuple[dict, dict]:
    """Episodes of the paced simulator under the wall-clock controller; also returns one real
    observation (for the server's requests)."""
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.eval.realtime import GymEnvIO, RealtimeController, control_freq_of

    s = evaluator_settings(policy, max_steps)
    freq = control_freq_of(policy.env_meta)
    env = RobomimicGymEnv(s["env_meta"], s["obs_keys"], n_obs_steps=s["n_obs_steps"], n_action_steps=1,
                          max_steps=s["max_steps"])
    io = GymEnvIO(env, policy, mode, s["obs_keys"], s["n_action_steps"], s["n_obs_steps"])
    stats, success, to_success, sample_obs = [], [], [], None
    load_before = os.getloadavg()[0]        # other work on the machine competes with the loop's threads
    try:
        for i in range(episodes):
            io.reset(seed=seed_offset + i)
            if sample_obs is None:
                sample_obs = {k: np.array(io.obs[k]) for k in s["obs_keys"]}
            if hasattr(policy, "reset"):
                policy.reset()
            if policy_seed is not None:
                import torch
                torch.manual_seed(policy_seed + seed_offset + i)
            ctl = RealtimeController(io.infer, io.observe, io.step, control_freq=freq, mode=mode,
                                     action_horizon=s["n_action_steps"])
            st = ctl.run(max_periods=4 * s["max_steps"])
            stats.append(st)
            ok = bool(io.info.get("success"))
            success.append(ok)
            if ok:
                to_success.append(st.periods)
    finally:
        env.close()
    row = {**base, "mode": "wallclock", "exec_mode": io.source.effective_mode, "rtc_fallback": io.source.rtc_fallback,
           "delay": "measured", "control_freq": freq,
           "success_rate": float(np.mean(success)),
           "periods_to_success": float(np.mean(to_success)) if to_success else None,
           "deadline_misses": int(sum(st.deadline_misses for st in stats)),
           "starved_ticks": int(sum(st.starved_ticks for st in stats)),
           "late_ticks": int(sum(st.late_ticks for st in stats)),
           "late_at": [st.late_at for st in stats],        # per episode: the ticks at which overruns were noticed
           "periods": int(sum(st.periods for st in stats)),
           "period_ms_mean": float(np.mean([st.period_ms_mean for st in stats])),
           "period_ms_p95": float(np.max([st.period_ms_p95 for st in stats])),
           "jitter_ms_p95": float(np.max([st.jitter_ms_p95 for st in stats])),
           "latency_ms_p50": float(np.median(np.concatenate([st.latency_ms for st in stats]))),
           "latency_ms_p95": float(np.percentile(np.concatenate([st.latency_ms for st in stats]), 95)),
           "delay_steps_p50": float(np.median(np.concatenate([st.delays for st in stats]))),
           "delay_steps_max": int(max(max(st.delays, default=0) for st in stats)),
           # the first chunk of each episode, computed before its clock started (no tick waits for it)
           "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],     # before, after
           "prime_ms_max": max((st.prime_ms for st in stats if st.prime_ms is not None), default=None),
           "episodes": episodes}
    return row, sample_obs


def server_row(policy, base: dict, obs: dict, requests: int, prefix_len: int | None = None) -> dict:
    """Round trips over loopback to an in-process ``PolicyServer`` (``prefix_len``: requests carry
    a committed prefix of that many rows, the rtc request; the reply is the whole chunk)."""
    from jumpflow.serve import PolicyServer, packb, unpackb

    srv = PolicyServer(policy, host="127.0.0.1", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy
            client = WebsocketClientPolicy("127.0.0.1", srv.port)
            infer, close, kind = client.infer, (lambda: client._ws.close()), "openpi_client"
        except ImportError:
            from websockets.sync.client import connect
            ws = connect(f"ws://127.0.0.1:{srv.port}", compression=None, max_size=None)
            ws.recv()                                                  # metadata

            def infer(o):
                ws.send(packb(o))
                reply = ws.recv()
                if isinstance(reply, str):          # the server's error frame: its text names the problem
                    raise RuntimeError(reply)  # noqa: TRY004
                return unpackb(reply)
            close, kind = ws.close, "websockets"
        if prefix_len is not None:
            obs = {**obs, "prefix": np.zeros((prefix_len, int(policy.action_dim)), np.float32)}
        rtt, inner = [], []
        for i in range(requests + 5):
            t0 = time.perf_counter()
            reply = infer(obs)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= 5:                                                  # warm-up
                rtt.append(dt)
                inner.append(reply["policy_timing"]["infer_ms"])
        close()
    finally:
        srv.shutdown()
        thread.join(timeout=10)
    return {**base, "mode": "server", "client": kind, "requests": requests, "prefix_len": prefix_len,
            "roundtrip_ms_p50": float(np.percentile(rtt, 50)), "roundtrip_ms_p95": float(np.percentile(rtt, 95)),
            "infer_ms_p50": float(np.percentile(inner, 50)),
            "overhead_ms_p50": float(np.percentile(np.asarray(rtt) - np.asarray(inner), 50))}


def parse_delays(text: str) -> list:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        out.append(tok if tok == "measured" else int(tok))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run directories (or checkpoint files) of trained policies")
    ap.add_argument("--fake", action="store_true", help="bench a zero-action stand-in policy (smoke test)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--delays", default="0,1,2,4,8", help="control periods, or 'measured'")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per (mode, delay) row")
    ap.add_argument("--policy-seed", type=int, default=0,
                    help="seed of the policy noise per episode (same in every row: paired comparisons); -1: unseeded")
    ap.add_argument("--execute-steps", type=int, default=None,
                    help="steps between requests in sync/async/rtc (default: the policy's n_action_steps)")
    ap.add_argument("--append", action="store_true", help="add the rows to the result file's instead of replacing them")
    ap.add_argument("--max-steps", type=int, default=None, help="episode cap (default: the task's)")
    ap.add_argument("--envs", type=int, default=1,
                    help="environments per lock-step batch of the mode rows (spawned workers; latency is per batch call)")
    ap.add_argument("--wallclock-episodes", type=int, default=5, help="0: skip the wall-clock rows")
    ap.add_argument("--wallclock-mode", default="async", help=f"comma list of {MODES}: one row each")
    ap.add_argument("--roundtrips", type=int, default=200, help="server requests (0: skip the server rows)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="result file (default bench/results/realtime.json)")
    args = ap.parse_args(argv)
    if not args.runs and not args.fake:
        ap.error("give run directories, or --fake")
    if args.envs < 1:
        ap.error(f"--envs: must be >= 1, got {args.envs}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {MODES}")
    delays = parse_delays(args.delays)
    wallclock_modes = [m.strip() for m in args.wallclock_mode.split(",") if m.strip()]
    for m in wallclock_modes:
        if m not in MODES:
            ap.error(f"--wallclock-mode: {m!r} is not one of {MODES}")
    from jumpflow.eval.rollout import TEST_SEED_OFFSET
    from jumpflow.serve import load_serving_policy

    rows = []
    for run in ([None] if args.fake else []) + list(args.runs):
        policy = HoldPolicy() if run is None else load_serving_policy(run, device=args.device)
        base = describe(policy, run)
        print(f"{base['run']}: {base['task']} / {base['objective']} nfe {base['nfe']}", flush=True)
        if modes and delays:
            rows += mode_rows(policy, base, delays, modes, args.episodes, args.max_steps,
                              None if args.policy_seed < 0 else args.policy_seed, args.execute_steps, args.envs)
        sample = None
        for wmode in (wallclock_modes if args.wallclock_episodes > 0 else []):
            row, sample = wallclock_row(policy, base, args.wallclock_episodes, args.max_steps, wmode,
                                        TEST_SEED_OFFSET, None if args.policy_seed < 0 else args.policy_seed)
            rows.append(row)
            print(f"  wallclock {wmode}: success {row['success_rate']:.2f}, misses {row['deadline_misses']}/"
                  f"{row['periods']} periods, delay p50 {row['delay_steps_p50']}", flush=True)
        if args.roundtrips > 0:
            if sample is None:
                from jumpflow.serve import policy_metadata, zero_request
                sample = zero_request(policy_metadata(policy))
            rows.append(server_row(policy, base, sample, args.roundtrips))
            if getattr(policy, "supports_prefix", False) and getattr(policy, "prefix_max", 0):
                rows.append(server_row(policy, base, sample, args.roundtrips, prefix_len=int(policy.prefix_max)))
    config = {"runs": args.runs or ["fake"], "modes": modes, "delays": delays, "episodes": args.episodes,
              "max_steps": args.max_steps, "envs": args.envs, "wallclock_episodes": args.wallclock_episodes,
              "wallclock_mode": args.wallclock_mode, "roundtrips": args.roundtrips, "device": args.device,
              "policy_seed": args.policy_seed, "execute_steps": args.execute_steps,
              "note": "delay in control periods (20 Hz unless the env says otherwise); periods_to_success counts "
                      "stalls; sync pays d periods per chunk, async/rtc/ensemble only where the plan runs out"}
    out = Path(args.out) if args.out else RESULTS / "realtime.json"
    if args.append and out.exists():
        old = json.loads(out.read_text())
        parts = old["config"].get("parts", [old["config"]])
        config, rows = {"parts": [*parts, config]}, old["rows"] + rows
    write_results("realtime", config, rows, path=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
