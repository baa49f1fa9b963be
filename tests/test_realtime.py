"""Execution modes (sync / async / ensemble / rtc) on a scripted policy and a recording env, the
latency-to-delay conversion, and the wall-clock controller. No simulator."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

H, N_OBS, N_ACT, A = 8, 2, 4, 3          # horizon, history, executed steps per chunk, action dim
L = H - (N_OBS - 1)                      # future rows of a chunk


class RecordingEnv(gym.Env):
    """Observation ``step: (N_OBS, 1)`` = the executed-step count (history repeats the first);
    records every executed action; success once ``success_at`` actions have run."""

    def __init__(self, success_at: int = 12, max_steps: int = 40):
        self.success_at, self.max_steps = success_at, max_steps
        self.observation_space = gym.spaces.Dict({"step": gym.spaces.Box(-np.inf, np.inf, (N_OBS, 1), np.float32)})
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (N_ACT, A), np.float32)
        self.episodes: list[list[np.ndarray]] = []

    def _obs(self):
        return {"step": np.array([[max(0, self.k - 1)], [self.k]], dtype=np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k, self.done = 0, False
        self.episodes.append([])
        self.info = {"success": False, "max_reward": 0.0, "steps": 0, "error": ""}
        return self._obs(), dict(self.info)

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        action = action[None] if action.ndim == 1 else action
        term = trunc = False
        if self.done:
            return self._obs(), 0.0, True, False, dict(self.info)
        for a in action:
            self.episodes[-1].append(a.copy())
            self.k += 1
            self.info["steps"] = self.k
            if self.k >= self.success_at:
                self.info.update(success=True, max_reward=1.0)
                term = True
                break
            if self.k >= self.max_steps:
                trunc = True
                break
        self.done = term or trunc
        return self._obs(), float(term), term, trunc, dict(self.info)


class ScriptedPolicy:
    """Chunk row ``i`` of a request made at step ``k_req`` is ``(k_req, i - (N_OBS - 1), 0)``: the
    future row ``j = i - N_OBS + 1`` is the action for step ``k_req + j``. With ``prefix_aware``,
    ``supports_prefix`` is true and the committed prefix replaces the first future rows
    (marked 1 in the last column), as an ideal real-time-chunking policy would."""

    n_obs_steps, n_action_steps, horizon, action_dim = N_OBS, N_ACT, H, A

    def __init__(self, prefix_aware: bool = False, clock=None, latency: float = 0.0):
        self.supports_prefix = prefix_aware
        self.calls: list[dict] = []
        self.clock, self.latency = clock, latency

    def reset(self):
        pass

    def predict_chunk(self, obs, prefix=None, prefix_len=0):
        if self.clock is not None:
            self.clock.t += self.latency
        k = obs["step"][:, -1, 0].numpy()                                       # (B,)
        b = k.shape[0]
        chunk = np.zeros((b, H, A), dtype=np.float32)
        chunk[:, :, 0] = k[:, None]
        chunk[:, :, 1] = np.arange(H) - (N_OBS - 1)
        self.calls.append({"k": int(k[0]), "prefix": None if prefix is None else prefix.numpy().copy(),
                           "prefix_len": prefix_len})
        if prefix is not None:
            assert self.supports_prefix and prefix.shape == (b, prefix_len, A)
            chunk[:, N_OBS - 1:N_OBS - 1 + prefix_len] = prefix.numpy()
            chunk[:, N_OBS - 1:N_OBS - 1 + prefix_len, 2] = 1.0
        return chunk

    def predict_action(self, obs):
        return self.predict_chunk(obs)[:, N_OBS - 1:N_OBS - 1 + N_ACT]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _evaluate(policy, mode, delay, success_at=12, max_steps=40, n_episodes=1, **kw):
    from jumpflow.eval.rollout import RolloutEvaluator

    env = RecordingEnv(success_at, max_steps)
    ev = RolloutEvaluator(None, n_episodes=n_episodes, max_steps=max_steps, n_obs_steps=N_OBS,
                          n_action_steps=N_ACT, obs_keys=["step"], mode=mode, delay=delay,
                          env_fn=lambda: env, **kw)
    res = ev.run(policy)
    ev.close()
    return res, np.stack(env.episodes[-1])


def _expect(pairs):
    return np.array([[kr, j, 0.0] for kr, j in pairs], dtype=np.float32)


@pytest.mark.parametrize("delay", [0, 2])
def test_sync_executes_chunks_and_pays_delay_in_stalls(delay):
    """sync: the first N_ACT rows of the chunk requested every N_ACT steps; the world waits
    ``delay`` periods per request (12 steps = 3 requests)."""
    res, executed = _evaluate(ScriptedPolicy(), "sync", delay)
    np.testing.assert_array_equal(executed, _expect([(4 * (k // 4), k % 4) for k in range(12)]))
    ep = res["episodes"][0]
    assert res["mode"] == "sync" and ep["success"] and ep["length"] == 12 and ep["requests"] == 3
    assert ep["periods_to_success"] == 12 + 3 * delay and ep["stall_periods"] == 3 * delay
    assert res["mean_periods_to_success"] == 12 + 3 * delay


def test_async_delay_two_skips_passed_rows():
    """async, d = 2, a request every 4 steps (execute_steps given): the first chunk is waited for
    (2 stalls); chunk requested at k_req arrives at k_req + 2 and runs from its row 2; the old one
    runs until then."""
    res, executed = _evaluate(ScriptedPolicy(), "async", 2, success_at=14, execute_steps=N_ACT)
    expected = []
    for k in range(14):
        k_req = max(0, 4 * ((k - 2) // 4))
        expected.append((k_req, k - k_req))
    np.testing.assert_array_equal(executed, _expect(expected))
    ep = res["episodes"][0]
    assert ep["periods_to_success"] == 14 + 2 and ep["requests"] == 4 and res["rtc_fallback"] is False


def test_async_stalls_when_the_delay_outlasts_the_chunk():
    """async, d = 8 > L = 7 future rows: a chunk requested 4 steps into the last one arrives after
    it ran out; rows skipped = steps actually passed (3 of them), not d."""
    res, executed = _evaluate(ScriptedPolicy(), "async", 8, success_at=11, execute_steps=N_ACT)
    # r0 at k=0 (T 0 -> 8), runs rows 0..6 (k 0..6); r1 requested at k=4 (T 12) arrives T 20 at k=7
    np.testing.assert_array_equal(executed[:7], _expect([(0, k) for k in range(7)]))
    np.testing.assert_array_equal(executed[7:11], _expect([(4, 3), (4, 4), (4, 5), (4, 6)]))
    ep = res["episodes"][0]
    # periods: 8 initial stall + 7 steps + stall from T 15 to 20 (5) + 4 steps = 24
    assert ep["periods_to_success"] == 24 and ep["stall_periods"] == 13


@pytest.mark.parametrize("delay", [0, 1])
def test_ensemble_weights_are_act_exponential_oldest_first(delay):
    """ensemble, a request every step, decay m = 0.5: the action at step k averages row k - k' of
    every chunk requested at k' that has arrived (k' + d <= k, at most L rows back), weights
    exp(-m i) with i = 0 the oldest."""
    m = 0.5
    res, executed = _evaluate(ScriptedPolicy(), "ensemble", delay, success_at=15, ensemble_decay=m)
    for k in range(15):
        reqs = [kp for kp in range(max(0, k - L + 1), k + 1) if kp + delay <= k or kp == 0]
        w = np.exp(-m * np.arange(len(reqs)))
        w /= w.sum()
        want = [np.dot(w, reqs), np.dot(w, [k - kp for kp in reqs]), 0.0]
        np.testing.assert_allclose(executed[k], want, rtol=1e-5, atol=1e-5, err_msg=f"step {k}")
    assert res["episodes"][0]["periods_to_success"] == 15 + delay
    assert res["episodes"][0]["requests"] == 15


def test_ensemble_every_n_steps():
    res, executed = _evaluate(ScriptedPolicy(), "ensemble", 0, success_at=10, ensemble_every=3,
                              ensemble_decay=0.0)
    for k in range(10):
        reqs = [kp for kp in range(0, k + 1, 3) if k - kp < L]
        np.testing.assert_allclose(executed[k, 0], np.mean(reqs), rtol=1e-6)
    assert res["episodes"][0]["requests"] == 4          # k = 0, 3, 6, 9


def test_rtc_passes_the_committed_prefix():
    """rtc, d = 2: each request after the first carries the 2 planned actions of the steps that
    pass during inference; the executed stream is async's, continued by the prefix rows."""
    policy = ScriptedPolicy(prefix_aware=True)
    res, executed = _evaluate(policy, "rtc", 2, success_at=14, execute_steps=N_ACT)
    assert res["mode"] == "rtc" and not res["rtc_fallback"] and res["execute_steps"] == N_ACT
    assert [c["k"] for c in policy.calls] == [0, 4, 8, 12]
    assert policy.calls[0]["prefix"] is None
    np.testing.assert_array_equal(policy.calls[1]["prefix"][0], _expect([(0, 4), (0, 5)]))
    assert policy.calls[1]["prefix_len"] == 2
    # the plan at k = 8, 9 is chunk r1's rows 4, 5 (fresh rows: last column 0)
    np.testing.assert_array_equal(policy.calls[2]["prefix"][0], _expect([(4, 4), (4, 5)]))
    expected = [(max(0, 4 * ((k - 2) // 4)), k - max(0, 4 * ((k - 2) // 4))) for k in range(14)]
    np.testing.assert_array_equal(executed, _expect(expected))     # skipped rows = the prefix rows


def test_rtc_falls_back_to_async_without_prefix_support():
    policy = ScriptedPolicy(prefix_aware=False)
    res, executed = _evaluate(policy, "rtc", 2, success_at=14)
    _, async_executed = _evaluate(ScriptedPolicy(), "async", 2, success_at=14)
    assert res["mode"] == "async" and res["requested_mode"] == "rtc" and res["rtc_fallback"] is True
    assert all(c["prefix"] is None for c in policy.calls)
    np.testing.assert_array_equal(executed, async_executed)


@pytest.mark.parametrize("latency,freq,steps", [(0.0, 20, 0), (1e-4, 20, 1), (0.05, 20, 1), (0.0501, 20, 2),
                                                (0.1, 20, 2), (0.15, 20, 3), (0.15, 10, 2), (0.021, 50, 2)])
def test_delay_steps(latency, freq, steps):
    from jumpflow.eval.realtime import delay_steps
    assert delay_steps(latency, freq) == steps


def test_measured_delay_uses_the_wall_clock():
    """delay="measured": a policy taking 0.12 s at 20 Hz costs ceil(2.4) = 3 periods per request."""
    clock = FakeClock()
    res, executed = _evaluate(ScriptedPolicy(clock=clock, latency=0.12), "sync", "measured", clock=clock)
    assert res["delay"] == "measured" and res["delay_steps_p50"] == 3 and res["delay_steps_max"] == 3
    assert res["episodes"][0]["periods_to_success"] == 12 + 3 * 3 and res["latency_ms_p50"] == pytest.approx(120)
    clock = FakeClock()
    res, executed = _evaluate(ScriptedPolicy(clock=clock, latency=0.12), "async", "measured", clock=clock,
                              control_freq=10.0, execute_steps=N_ACT)     # 10 Hz: ceil(1.2) = 2
    assert res["delay_steps_max"] == 2 and res["episodes"][0]["periods_to_success"] == 12 + 2
    np.testing.assert_array_equal(executed, _expect([(max(0, 4 * ((k - 2) // 4)), k - max(0, 4 * ((k - 2) // 4)))
                                                     for k in range(12)]))
    # default execution horizon: s = N_ACT - (the last measured d = 2) = 2 after the first request
    clock = FakeClock()
    policy = ScriptedPolicy(clock=clock, latency=0.12)
    res, executed = _evaluate(policy, "async", "measured", clock=clock, control_freq=10.0)
    assert res["execute_steps"] == "auto" and res["execute_steps_used"] == [2]
    assert [c["k"] for c in policy.calls] == [0, 2, 4, 6, 8, 10] and executed[:, 1].max() <= N_ACT - 1


def test_invalid_mode_and_delay_raise():
    from jumpflow.eval.rollout import RolloutEvaluator
    with pytest.raises(ValueError, match="mode"):
        RolloutEvaluator(None, env_fn=RecordingEnv, obs_keys=["step"], mode="fast")
    with pytest.raises(ValueError, match="delay"):
        RolloutEvaluator(None, env_fn=RecordingEnv, obs_keys=["step"], delay=-1)
    with pytest.raises(ValueError, match="delay"):
        RolloutEvaluator(None, env_fn=RecordingEnv, obs_keys=["step"], delay="sometimes")


def test_scheduler_committed_prefix_is_the_plan():
    from jumpflow.eval.realtime import ChunkScheduler
    s = ChunkScheduler("rtc", execute_steps=4)
    assert s.needs_request(0) and s.committed(0, 3) is None
    chunk = np.arange(5, dtype=np.float32).reshape(1, 5, 1)
    s.receive(chunk, 0, 0)
    s.mark_requested(0)
    assert s.committed(3, 3)[0, :, 0].tolist() == [3, 4]               # only 2 rows left
    assert not s.needs_request(3) and s.needs_request(4)


# ---------------------------------------------------------------------- wall-clock controller
def _controller(mode, infer_s, chunk_len, execute_steps, freq=100.0, action_horizon=8, prime=True):
    from jumpflow.eval.realtime import RealtimeController

    log = []

    def infer(obs, prefix):
        time.sleep(infer_s)                       # row j: (k_req, j)
        return np.stack([np.full(chunk_len, obs), np.arange(chunk_len)], axis=1).astype(np.float32)

    def step(action):
        log.append(None if action is None else action.copy())
        return False

    ctl = RealtimeController(infer, lambda: len([a for a in log if a is not None]), step, control_freq=freq,
                             mode=mode, execute_steps=execute_steps, action_horizon=action_horizon, prime=prime)
    return ctl, log


def test_controller_default_execution_horizon_stays_within_the_action_horizon():
    """execute_steps=None: requests every action_horizon - d ticks (d the measured delay, 1 here),
    so no executed row reaches the action horizon (chunks are longer: 10 rows)."""
    ctl, log = _controller("async", 0.001, chunk_len=10, execute_steps=None, freq=50.0, action_horizon=5)
    stats = ctl.run(max_periods=40)
    executed = [a for a in log if a is not None]
    assert stats.steps == len(executed) and all(a[1] == k - a[0] for k, a in enumerate(executed))
    request_steps = sorted({int(a[0]) for a in executed})
    # a loaded machine may deliver a chunk a tick late, which shifts later requests and runs one
    # row past the horizon; the schedule itself is every 4 steps (5 if the horizon ignored d)
    assert np.median(np.diff(request_steps)) == 4, request_steps
    assert sum(a[1] > 4 for a in executed) <= 2, [a[1] for a in executed]
    assert stats.requests >= 8


def test_controller_fast_inference_never_starves():
    ctl, log = _controller("async", 0.001, chunk_len=10, execute_steps=5)
    stats = ctl.run(max_periods=40)
    assert stats.periods == 40 and stats.requests >= 7
    assert stats.prime_ms is not None and stats.prime_ms >= 1.0     # the first chunk came before the clock
    # fast inference never leaves a tick without an action; late ticks are the OS oversleeping the
    # loop (a loaded machine shows some), so they bound nothing here: the wall-clock figures are
    # bench/realtime's, not a unit test's
    assert stats.starved_ticks == 0
    assert stats.period_ms_mean >= 8.0 and stats.jitter_ms_p95 >= 0.0      # never faster than the clock
    executed = [a for a in log if a is not None]
    assert stats.steps == len(executed) == stats.periods - stats.deadline_misses
    # every executed action is row (step - k_req) of the chunk requested at k_req
    assert all(a[1] == k - a[0] for k, a in enumerate(executed))


def test_controller_priming_decides_whether_the_first_ticks_starve():
    """With ``prime`` (default) the first tick executes row 0 of the chunk requested at step 0,
    computed before the clock started; without it the ticks until that chunk arrives starve (the
    35 ms inference spans 3 ticks at 100 Hz) and the robot holds; its first action still is row 0
    (stalled ticks do not advance the step count, so no row is skipped)."""
    primed, log_p = _controller("async", 0.035, chunk_len=10, execute_steps=5, prime=True)
    st_p = primed.run(max_periods=3)
    assert log_p[0] is not None and log_p[0].tolist() == [0.0, 0.0] and st_p.prime_ms >= 35.0
    assert st_p.latency_ms[0] == st_p.prime_ms and st_p.requests >= 1
    cold, log_c = _controller("async", 0.035, chunk_len=10, execute_steps=5, prime=False)
    st_c = cold.run(max_periods=8)
    assert st_c.prime_ms is None and log_c[0] is None and st_c.starved_ticks >= 3
    first = next(a for a in log_c if a is not None)
    assert first.tolist() == [0.0, 0.0]


def test_controller_counts_misses_of_slow_inference():
    """100 Hz, inference 35 ms, chunks of 2 actions executed whole: each cycle executes 2 actions
    and waits ~4 ticks for the next chunk: about 2/3 of the ticks are starved."""
    ctl, log = _controller("async", 0.035, chunk_len=2, execute_steps=2)
    stats = ctl.run(max_periods=60)
    assert stats.periods == 60
    frac = stats.deadline_misses / stats.periods
    assert 0.5 <= frac <= 0.9, stats
    # most misses are starved ticks; on a loaded machine some of them show as late ticks instead
    assert stats.starved_ticks >= 0.25 * stats.periods, stats
    assert all(25.0 <= lat <= 200.0 for lat in stats.latency_ms) and set(stats.delays) >= {4}
    executed = [a for a in log if a is not None]
    assert stats.steps == len(executed) and all(a[1] == k - a[0] for k, a in enumerate(executed))


def test_controller_sync_blocks_and_misses_late_ticks():
    """sync: the loop runs inference itself; the ticks it overruns are late, none are starved."""
    ctl, _ = _controller("sync", 0.035, chunk_len=2, execute_steps=2)
    stats = ctl.run(max_periods=60)
    assert stats.starved_ticks == 0 and stats.late_ticks >= 0.4 * stats.periods
    assert stats.as_dict()["deadline_misses"] == stats.late_ticks


@pytest.mark.sim
def test_bench_realtime_smallest_setting_on_a_stand_in_policy(tmp_path):
    """bench/realtime.py end to end on the simulator (Lift) with its zero-action stand-in:
    every mode x delay row (two episodes in one lock-step batch of two spawned envs), a wall-clock
    row and a server row, in the bench result format; a bad --envs stops before any work."""
    import json

    from bench.realtime import main

    out = tmp_path / "realtime.json"
    with pytest.raises(SystemExit):
        main(["--fake", "--envs", "0", "--out", str(out)])
    assert not out.exists()
    assert main(["--fake", "--episodes", "2", "--envs", "2", "--max-steps", "6", "--delays", "0,2",
                 "--wallclock-episodes", "1", "--roundtrips", "5", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "realtime" and {"machine", "config", "rows"} <= set(doc)
    rows = doc["rows"]
    assert [(r["mode"], r["delay"]) for r in rows[:8]] == [(m, d) for m in ("sync", "async", "ensemble", "rtc")
                                                          for d in (0, 2)]
    assert all(r["success_rate"] == 0.0 and r["steps"] == 6 for r in rows[:8])     # holding still never lifts
    assert all(r["episodes"] == 2 and r["envs"] == 2 for r in rows[:8]) and doc["config"]["envs"] == 2
    wall = rows[8]
    assert wall["mode"] == "wallclock" and wall["periods"] >= 6 and wall["prime_ms_max"] > 0
    assert wall["deadline_misses"] == wall["starved_ticks"] + wall["late_ticks"]
    assert rows[9]["mode"] == "server" and 0 < rows[9]["roundtrip_ms_p50"] <= rows[9]["roundtrip_ms_p95"]


@pytest.mark.sim
def test_async_blocks_through_spawned_envs_and_expert_in_sync_with_delay(lift_demos):
    """Real simulator: (1) async d = 0 with 3-step requests through two spawned workers (action
    blocks shorter than a chunk) replays the demos exactly; (2) the closed-loop expert under
    sync d = 2 acts exactly as under d = 0 and pays 2 stall periods per (one-step) chunk."""
    from robot_fixtures import ReplayPolicy

    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.experts import ExpertPolicy
    from jumpflow.envs.sim import default_env_meta
    from jumpflow.eval.rollout import RolloutEvaluator

    with RobomimicFile(lift_demos) as rf:
        actions = [rf.data[n]["actions"][()] for n in rf.demo_names()]
    ev = RolloutEvaluator(lift_demos, n_episodes=2, n_envs=2, n_action_steps=3, seed_offset=0, mode="async", delay=0)
    res = ev.run(ReplayPolicy(actions, n_envs=2, n_action_steps=3))
    ev.close()
    assert res["success_rate"] == 1.0 and [e["length"] for e in res["episodes"]] == [len(a) for a in actions[:2]]
    assert [e["periods_to_success"] for e in res["episodes"]] == [len(a) for a in actions[:2]]

    ev = RolloutEvaluator(default_env_meta("Lift"), n_episodes=1, n_action_steps=1)
    r0, r2 = ev.run(ExpertPolicy("Lift"), delay=0), ev.run(ExpertPolicy("Lift"), delay=2)
    ev.close()
    e0, e2 = r0["episodes"][0], r2["episodes"][0]
    assert e0["success"] and e2["success"] and e0["length"] == e2["length"]
    assert e0["periods_to_success"] == e0["length"] and e2["periods_to_success"] == 3 * e2["length"]


def test_behaviour_mode_info_is_kept_per_episode():
    """Envs with behaviour modes report ``info["mode"]`` / ``["mode_switches"]``: the episode
    record keeps them (what jumpflow.eval.modes.mode_metrics reads)."""
    from jumpflow.eval.rollout import RolloutEvaluator

    class ModeEnv(RecordingEnv):
        def reset(self, *, seed=None, options=None):
            obs, _ = super().reset(seed=seed)
            self.info.update(mode=None, mode_switches=0)
            return obs, dict(self.info)

        def step(self, action):
            self.info.update(mode="left" if self.k >= 2 else None, mode_switches=1)
            return super().step(action)

    ev = RolloutEvaluator(None, n_episodes=2, n_obs_steps=N_OBS, n_action_steps=N_ACT, obs_keys=["step"],
                          env_fn=lambda: ModeEnv(success_at=6))
    res = ev.run(ScriptedPolicy(), mode="async", delay=1)
    ev.close()
    assert [(e["mode"], e["mode_switches"]) for e in res["episodes"]] == [("left", 1), ("left", 1)]
    assert "mode" not in _evaluate(ScriptedPolicy(), "sync", 0)[0]["episodes"][0]


class NoisyPolicy(ScriptedPolicy):
    """ScriptedPolicy plus noise drawn from torch's global generator (a stochastic one-step policy)."""

    def predict_chunk(self, obs, prefix=None, prefix_len=0):
        import torch

        chunk = super().predict_chunk(obs, prefix, prefix_len)
        noise = torch.randn(chunk.shape).numpy()
        if prefix is not None:
            noise[:, N_OBS - 1:N_OBS - 1 + prefix_len] = 0.0                    # committed rows stay exact
        return chunk + noise


def test_policy_seed_gives_common_random_numbers_across_modes_and_delays():
    """With ``policy_seed`` the same episode draws the same noise in every mode: at d = 0 sync,
    async and rtc execute the same actions, sync executes the same actions at every delay (the
    world waits), and two runs of one mode agree; without it, two runs differ."""
    runs = {(m, d): _evaluate(NoisyPolicy(prefix_aware=True), m, d, success_at=14, policy_seed=5)[1]
            for m, d in [("sync", 0), ("async", 0), ("rtc", 0), ("sync", 3)]}
    for key in [("async", 0), ("rtc", 0), ("sync", 3)]:
        np.testing.assert_array_equal(runs[key], runs[("sync", 0)], err_msg=str(key))
    again = _evaluate(NoisyPolicy(prefix_aware=True), "rtc", 2, success_at=14, policy_seed=5)[1]
    np.testing.assert_array_equal(again, _evaluate(NoisyPolicy(prefix_aware=True), "rtc", 2, success_at=14,
                                                   policy_seed=5)[1])
    a = _evaluate(NoisyPolicy(), "sync", 0, success_at=14)[1]
    assert not np.array_equal(a, _evaluate(NoisyPolicy(), "sync", 0, success_at=14)[1])


@pytest.mark.parametrize("mode", ["async", "rtc"])
@pytest.mark.parametrize("delay", [1, 2])
def test_async_and_rtc_execute_only_rows_within_the_action_horizon(mode, delay):
    """Default execution horizon ``s = n_action_steps - d``: a chunk requested at ``k`` arrives at
    ``k + d`` and runs rows ``d .. n_action_steps - 1`` (the rows sync runs, less the ``d`` that pass
    during inference); the next request goes out at ``k + s``, so the committed prefix is rows
    ``s .. n_action_steps - 1`` and no row at or past ``n_action_steps`` is ever executed. (With
    ``s = n_action_steps`` each chunk ran ``d`` rows past the policy's action horizon and the
    prefix was its least reliable rows: Reach Around rtc at d = 4 lost 0.11 success to sync.)"""
    policy = ScriptedPolicy(prefix_aware=mode == "rtc")
    res, executed = _evaluate(policy, mode, delay, success_at=20, max_steps=40)
    s = N_ACT - delay
    assert res["execute_steps"] == "auto" and res["episodes"][0]["success"]
    assert [c["k"] for c in policy.calls] == list(range(0, 20, s))[:len(policy.calls)]
    assert len(policy.calls) >= (20 - N_ACT) // s
    assert executed[:, 1].max() <= N_ACT - 1, executed[:, 1]
    # the first chunk runs from row 0 (the robot stalled d periods); every later one from row d
    np.testing.assert_array_equal(executed[:N_ACT, :2], _expect([(0, j) for j in range(N_ACT)])[:, :2])
    for k in range(N_ACT, 20):
        k_req = s * ((k - delay) // s)
        assert tuple(executed[k, :2]) == (k_req, k - k_req), (k, executed[k])
    assert res["episodes"][0]["stall_periods"] == delay
    if mode == "rtc":
        for c in policy.calls[1:]:
            np.testing.assert_array_equal(c["prefix"][0, :, 1], np.arange(s, s + delay))
