"""Execution modes of action-chunk policies, and a wall-clock controller.

A chunked policy is asked for a chunk of future actions from the observation at control step
``k_req``; row ``j`` of the chunk is the action for step ``k_req + j``. How chunks become
executed actions is the *execution mode* (DESIGN.md, "a policy executes in one of four modes"):

- ``sync``: the world waits while the policy thinks; the chunk's first ``execute_steps``
  actions run, then the next chunk is requested.
- ``async``: inference runs while the previous chunk keeps executing. A chunk requested at step
  ``k_req`` arrives ``d`` control periods later, at step ``k_req + d`` when the old chunk lasted
  that long; its first ``d`` rows are skipped (those steps have passed) and it replaces the old
  one. A new chunk is requested ``execute_steps`` steps after the previous request (Black et
  al. 2025's execution horizon ``s``), so each chunk runs rows ``d .. s + d - 1``. By default
  (:func:`execution_horizon`) ``s = max(1, n_action_steps - d)``: a chunk runs the rows that
  ``sync`` runs, ``0 .. n_action_steps - 1``, less the ``d`` that pass during inference, and
  never a row past the policy's action horizon (with ``s = n_action_steps`` every chunk would
  run ``d`` rows further into its open-loop future than the policy was trained to execute). No
  request is made while one is in flight, so in practice ``s >= d``. When the old chunk runs
  out before the new one arrives the robot stalls (holds) and no more rows are skipped than
  steps actually passed.
- ``ensemble``: temporal ensembling (ACT, Zhao et al. 2023): a chunk is requested every
  ``ensemble_every`` steps; the action at step ``k`` is the weighted mean of every received
  chunk's row for ``k``, weights ``exp(-m * i)`` with ``i = 0`` the oldest chunk
  (``m = ensemble_decay``, ACT's 0.01).
- ``rtc``: real-time chunking by prefix conditioning (Black, Galliker, Levine 2025; the
  training-time form of arXiv 2512.05964): as ``async``, but the request carries the committed
  prefix, the actions the robot will execute while the policy thinks (the next ``d`` rows of
  the current plan), so the new chunk continues them.

:class:`ChunkScheduler` holds this bookkeeping once; the simulated-delay evaluator
(:class:`jumpflow.eval.rollout.RolloutEvaluator`) and the wall-clock
:class:`RealtimeController` both drive it. :func:`delay_steps` converts an inference latency to
control periods: ``d = ceil(latency * control_freq)`` (a chunk that took any time at all is
applied from the next control tick on).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MODES = ("sync", "async", "ensemble", "rtc")
DEFAULT_CONTROL_FREQ = 20.0


def delay_steps(latency_s: float, control_freq: float = DEFAULT_CONTROL_FREQ) -> int:
    """Control periods that an inference of ``latency_s`` seconds occupies: ``ceil(latency * f)``
    (``0`` only for a zero latency; float noise of 1e-9 periods is forgiven)."""
    if latency_s < 0 or control_freq <= 0:
        raise ValueError(f"latency ({latency_s}) must be >= 0 and control_freq ({control_freq}) > 0")
    return max(0, math.ceil(latency_s * control_freq - 1e-9))


def control_freq_of(env_meta: dict | None, default: float = DEFAULT_CONTROL_FREQ) -> float:
    """robomimic ``env_meta["env_kwargs"]["control_freq"]`` (robosuite's default, 20 Hz, when absent)."""
    if not env_meta:
        return float(default)
    return float((env_meta.get("env_kwargs") or {}).get("control_freq", default))


def execution_horizon(mode: str, n_action_steps: int, delay: int) -> int:
    """Default steps between requests: ``n_action_steps`` in ``sync`` (and ``ensemble``, which
    uses its own ``ensemble_every``); ``max(1, n_action_steps - delay)`` in ``async`` / ``rtc``, so
    that the rows a chunk runs, ``delay .. s + delay - 1``, stay within the action horizon."""
    if mode in ("async", "rtc"):
        return max(1, int(n_action_steps) - int(delay))
    return int(n_action_steps)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    return mode


class ChunkScheduler:
    """Chunk bookkeeping of one execution mode over a batch of ``B`` lock-step robots.

    Steps ``k`` count executed actions (stalls do not advance ``k``). The driver calls, per
    control period: :meth:`receive` for a chunk that has arrived, :meth:`needs_request` (when no
    request is in flight) and then :meth:`mark_requested`, and :meth:`actions` for the steps it
    executes (:meth:`available` says how many in a row it may take).

    Args:
        mode: one of :data:`MODES` (``sync`` and ``rtc`` keep ``async``'s plan; the driver makes
            the world wait, or passes :meth:`committed` to the policy).
        execute_steps: steps between requests in ``sync`` / ``async`` / ``rtc`` (``s``).
        ensemble_every: steps between requests in ``ensemble``.
        ensemble_decay: ACT's ``m`` in ``exp(-m * i)``, ``i = 0`` the oldest chunk.
    """

    def __init__(self, mode: str = "sync", execute_steps: int = 8, ensemble_every: int = 1,
                 ensemble_decay: float = 0.01):
        self.mode = check_mode(mode)
        if execute_steps < 1 or ensemble_every < 1:
            raise ValueError(f"execute_steps ({execute_steps}) and ensemble_every ({ensemble_every}) must be >= 1")
        self.execute_steps, self.ensemble_every = int(execute_steps), int(ensemble_every)
        self.ensemble_decay = float(ensemble_decay)
        self.reset()

    def reset(self) -> None:
        self._chunks: list[tuple[int, np.ndarray]] = []   # (k_req, (B, L, A)), oldest first
        self._last_request: int | None = None

    @property
    def interval(self) -> int:
        return self.ensemble_every if self.mode == "ensemble" else self.execute_steps

    # ------------------------------------------------------------------ plan
    def _drop_expired(self, k: int) -> None:
        self._chunks = [(s, c) for s, c in self._chunks if s + c.shape[1] > k]

    def available(self, k: int) -> int:
        """Consecutive steps from ``k`` that have an action (0: the robot must stall)."""
        self._drop_expired(k)
        if not self._chunks:
            return 0
        return max(s + c.shape[1] for s, c in self._chunks) - k

    def needs_request(self, k: int) -> bool:
        """Time to ask for a chunk (with none in flight): nothing planned, or ``interval`` steps
        since the last request."""
        return (self._last_request is None or self.available(k) == 0
                or k - self._last_request >= self.interval)

    def steps_to_request(self, k: int) -> int:
        """Steps the driver may execute from ``k`` before :meth:`needs_request` turns true."""
        if self._last_request is None:
            return 0
        return max(0, self._last_request + self.interval - k)

    def mark_requested(self, k: int) -> None:
        self._last_request = int(k)

    def committed(self, k: int, d: int) -> np.ndarray | None:
        """The planned actions for steps ``k .. k + d - 1`` (fewer where the plan ends sooner):
        ``(B, m, A)``, or ``None`` when ``m == 0``. The prefix ``rtc`` passes to the policy."""
        m = min(int(d), self.available(k))
        if m <= 0:
            return None
        return self.actions(k, m)

    def receive(self, chunk: np.ndarray, k_req: int, k: int) -> None:
        """A chunk ``(B, L, A)`` requested at step ``k_req`` arrives at step ``k >= k_req``."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 3:
            raise ValueError(f"chunk: expected (B, L, A), got shape {chunk.shape}")
        if k < k_req:
            raise ValueError(f"chunk requested at step {k_req} cannot arrive at an earlier step {k}")
        if self.mode == "ensemble":
            self._chunks.append((int(k_req), chunk))
            self._drop_expired(k)
        else:                                   # async / rtc / sync: the new chunk replaces the plan
            self._chunks = [(int(k_req), chunk)]

    def actions(self, k: int, m: int = 1) -> np.ndarray:
        """Actions ``(B, m, A)`` for steps ``k .. k + m - 1`` (``m <= available(k)``)."""
        if m < 1 or m > self.available(k):
            raise ValueError(f"{m} actions requested at step {k}, {self.available(k)} available")
        if self.mode != "ensemble":
            (s, c), = self._chunks
            return c[:, k - s:k - s + m].copy()
        out = []
        for step in range(k, k + m):
            rows = [c[:, step - s] for s, c in self._chunks if s <= step < s + c.shape[1]]
            w = np.exp(-self.ensemble_decay * np.arange(len(rows)))     # oldest chunk first
            w = (w / w.sum()).astype(np.float64)
            out.append(np.tensordot(w, np.stack(rows).astype(np.float64), axes=1))   # (B, A)
        return np.stack(out, axis=1).astype(np.float32)                         # (B, m, A)


# ---------------------------------------------------------------------- policies
class ChunkSource:
    """Asks a policy for future actions ``(B, L, A)`` as numpy float32.

    ``sync``: ``policy.predict_action(obs)`` (its ``n_action_steps`` rows; exactly what the
    evaluator always executed). Other modes: the future part of ``policy.predict_chunk(obs)``,
    ``chunk[:, n_obs_steps - 1:]`` (rows before it are the past steps of the observation
    history), or ``predict_action`` for a policy without ``predict_chunk``. ``rtc`` with a
    policy whose ``supports_prefix`` is true calls
    ``predict_chunk(obs, prefix=<(B, m, A) float32 tensor>, prefix_len=m)`` where ``prefix[:, j]``
    is the committed action of step ``k_req + j`` (chunk row ``n_obs_steps - 1 + j``); with
    nothing committed (``m = 0``) it calls ``predict_chunk(obs)``.
    """

    def __init__(self, policy, mode: str, n_action_steps: int, n_obs_steps: int):
        self.policy, self.mode = policy, check_mode(mode)
        self.n_action_steps = int(n_action_steps)
        self.n_obs_steps = int(getattr(policy, "n_obs_steps", n_obs_steps))
        self.use_chunk = mode != "sync" and hasattr(policy, "predict_chunk")
        self.supports_prefix = bool(getattr(policy, "supports_prefix", False)) and self.use_chunk
        self.rtc_fallback = mode == "rtc" and not self.supports_prefix

    @property
    def effective_mode(self) -> str:
        return "async" if self.rtc_fallback else self.mode

    def __call__(self, obs: dict, prefix: np.ndarray | None = None) -> np.ndarray:
        if not self.use_chunk:
            out = _to_numpy(self.policy.predict_action(obs))
            b = next(iter(obs.values())).shape[0]
            if out.ndim != 3 or out.shape[0] != b or out.shape[1] < self.n_action_steps:
                raise ValueError(f"policy.predict_action returned shape {tuple(out.shape)}, expected "
                                 f"({b}, >= {self.n_action_steps}, action_dim)")
            return out[:, : self.n_action_steps] if self.mode == "sync" else out
        if self.supports_prefix and self.mode == "rtc" and prefix is not None and prefix.shape[1] > 0:
            import torch
            out = self.policy.predict_chunk(obs, prefix=torch.from_numpy(np.ascontiguousarray(prefix, np.float32)),
                                            prefix_len=int(prefix.shape[1]))
        else:
            out = self.policy.predict_chunk(obs)
        out = _to_numpy(out)
        start = self.n_obs_steps - 1
        if out.ndim != 3 or out.shape[1] <= start:
            raise ValueError(f"policy.predict_chunk returned shape {tuple(out.shape)}, expected "
                             f"(B, > {start}, action_dim)")
        return out[:, start:]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# ---------------------------------------------------------------------- wall-clock controller
@dataclass
class RealtimeStats:
    """What one :meth:`RealtimeController.run` measured.

    ``deadline_misses = starved_ticks + late_ticks``: a *starved* tick had no action ready (the
    chunk had not arrived: inference too slow for the mode); a *late* tick passed entirely
    before the loop got to it (the loop itself overran: a blocking ``sync`` inference, a slow
    ``step_fn``, the OS). ``periods`` counts every tick, late ones included (time to success in
    control periods); ``period_ms_*`` are the measured intervals between consecutive ticks and
    ``jitter_ms_p95`` the 95th percentile of ``|interval - period|``. ``prime_ms`` is the latency
    of the first chunk when the controller waited for it before starting the clock (``prime``);
    it is in ``latency_ms`` too, but no tick waited for it.
    """

    mode: str
    control_freq: float
    # counts, in control periods (ticks) and environment steps
    periods: int = 0
    steps: int = 0
    starved_ticks: int = 0
    late_ticks: int = 0
    late_at: list = field(default_factory=list)     # the tick index at which each overrun was noticed
    # one entry per chunk request: its inference latency and its delay in whole periods
    requests: int = 0
    latency_ms: list = field(default_factory=list)
    delays: list = field(default_factory=list)
    # the clock as measured, in milliseconds
    period_ms_mean: float = 0.0
    period_ms_p95: float = 0.0
    jitter_ms_p95: float = 0.0
    prime_ms: float | None = None
    done: bool = False

    @property
    def deadline_misses(self) -> int:
        return self.starved_ticks + self.late_ticks

    def as_dict(self) -> dict:
        d = asdict(self)
        d["deadline_misses"] = self.deadline_misses
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        d["latency_ms_p50"], d["latency_ms_p95"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
        return d


class RealtimeController:
    """A control loop at a fixed frequency; inference runs in a background thread.

    Each tick (``1 / control_freq`` s apart, on an absolute schedule): a chunk that has arrived
    is merged (:class:`ChunkScheduler`), a new one is requested when due (``observe_fn()`` then
    ``infer_fn(obs, prefix)`` in a worker thread; in ``sync`` mode in the loop's own thread, so
    the loop blocks and the ticks it overruns are *late*), and ``step_fn(action)`` applies the
    tick's action ``(A,)``, or ``step_fn(None)`` when none is ready (the robot holds: a
    *starved* tick). ``step_fn`` returns true when the episode is over.

    The same loop runs a simulator paced to real time (:func:`gym_env_io`) or a robot's client
    (``infer_fn`` calling a policy server, ``observe_fn`` / ``step_fn`` talking to hardware).

    Args:
        infer_fn: ``(obs, prefix) -> (L, A)`` future actions from the observation's step
            (``prefix``: ``(m, A)`` committed actions in ``rtc`` mode, else ``None``).
        observe_fn: ``() -> obs``, the observation to request a chunk from.
        step_fn: ``(action (A,) | None) -> bool`` done.
        control_freq: ticks per second.
        mode: one of :data:`MODES`; ``rtc`` commits the next ``d`` planned actions with ``d`` the
            last measured delay in periods (1 before the first measurement).
        execute_steps: steps between requests in ``sync`` / ``async`` / ``rtc``; None (default):
            :func:`execution_horizon` of ``action_horizon`` and that same ``d``.
        action_horizon: the policy's ``n_action_steps`` (the rows of a chunk it is meant to run).
        ensemble_every, ensemble_decay: see :class:`ChunkScheduler`.
        prime: compute the first chunk before the first tick, as a robot waits for its first plan
            before it moves (default); false: the clock starts at once and the ticks before the
            first chunk arrives are starved.
        clock, sleep: the time source (tests may inject their own).
    """

    def __init__(self, infer_fn: Callable[[Any, np.ndarray | None], np.ndarray], observe_fn: Callable[[], Any],
                 step_fn: Callable[[np.ndarray | None], bool], control_freq: float = DEFAULT_CONTROL_FREQ,
                 mode: str = "async", execute_steps: int | None = None, ensemble_every: int = 1,
                 ensemble_decay: float = 0.01, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, action_horizon: int = 8, prime: bool = True):
        if control_freq <= 0:
            raise ValueError(f"control_freq: must be > 0, got {control_freq}")
        self.infer_fn, self.observe_fn, self.step_fn = infer_fn, observe_fn, step_fn
        self.control_freq, self.mode = float(control_freq), check_mode(mode)
        self.execute_steps = None if execute_steps is None else int(execute_steps)
        self.action_horizon = int(action_horizon)
        self.scheduler = ChunkScheduler(mode, self.execute_steps or self.action_horizon, ensemble_every,
                                        ensemble_decay)
        self.clock, self.sleep = clock, sleep
        self.prime = bool(prime)

    def _infer(self, obs, prefix):
        t0 = self.clock()
        out = np.asarray(self.infer_fn(obs, prefix), dtype=np.float32)
        if out.ndim != 2:
            raise ValueError(f"infer_fn returned shape {out.shape}, expected (L, A)")
        return out[None], self.clock() - t0

    def run(self, max_periods: int) -> RealtimeStats:
        """Run until ``step_fn`` reports done or ``max_periods`` ticks have passed."""
        period = 1.0 / self.control_freq
        sched = self.scheduler
        sched.reset()
        stats = RealtimeStats(mode=self.mode, control_freq=self.control_freq)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jumpflow-infer")
        pending = None                                  # (future, k_req)
        k, d_est = 0, 1
        tick_times: list[float] = []
        if self.prime:             # the first chunk, before the clock starts (no prefix exists yet)
            obs = self.observe_fn()
            sched.mark_requested(0)
            stats.requests += 1
            chunk, lat = self._infer(obs, None)
            self._record(stats, lat)
            stats.prime_ms = lat * 1e3
            d_est = max(1, delay_steps(lat, self.control_freq))
            sched.receive(chunk, 0, 0)
        next_t = self.clock()
        try:
            while stats.periods < max_periods:
                now = self.clock()
                if now < next_t:
                    self.sleep(next_t - now)
                    now = self.clock()
                late = int((now - next_t) // period)    # whole ticks that passed before we got here
                if late > 0:
                    late = min(late, max_periods - stats.periods)
                    stats.late_ticks += late
                    stats.late_at.append(stats.periods)
                    stats.periods += late
                    next_t += late * period
                    if stats.periods >= max_periods:
                        break
                tick_times.append(now)
                if pending is not None and pending[0].done():
                    chunk, lat = pending[0].result()
                    self._record(stats, lat)
                    d_est = max(1, delay_steps(lat, self.control_freq))
                    sched.receive(chunk, pending[1], k)
                    pending = None
                if self.execute_steps is None:
                    sched.execute_steps = execution_horizon(self.mode, self.action_horizon, d_est)
                if pending is None and sched.needs_request(k):
                    prefix = sched.committed(k, d_est) if self.mode == "rtc" else None
                    obs = self.observe_fn()
                    sched.mark_requested(k)
                    stats.requests += 1
                    p = None if prefix is None else prefix[0]
                    if self.mode == "sync":             # the loop blocks: late ticks follow
                        chunk, lat = self._infer(obs, p)
                        self._record(stats, lat)
                        sched.receive(chunk, k, k)
                    else:
                        pending = (pool.submit(self._infer, obs, p), k)
                if sched.available(k) > 0:
                    done = self.step_fn(sched.actions(k, 1)[0, 0])
                    k += 1
                else:
                    stats.starved_ticks += 1
                    done = self.step_fn(None)
                stats.periods += 1
                next_t += period
                if done:
                    stats.done = True
                    break
        finally:
            if pending is not None:
                pending[0].cancel()
            pool.shutdown(wait=True)
        stats.steps = k
        if len(tick_times) > 1:
            dt = np.diff(np.asarray(tick_times)) * 1e3
            stats.period_ms_mean = float(dt.mean())
            stats.period_ms_p95 = float(np.percentile(dt, 95))
            stats.jitter_ms_p95 = float(np.percentile(np.abs(dt - period * 1e3), 95))
        return stats

    def _record(self, stats: RealtimeStats, lat: float) -> None:
        stats.latency_ms.append(lat * 1e3)
        stats.delays.append(delay_steps(lat, self.control_freq))


# ---------------------------------------------------------------------- simulator adapter
class GymEnvIO:
    """``observe`` / ``step`` / ``infer`` callables of a :class:`RealtimeController` over one
    ``RobomimicGymEnv``-like env (dict observations ``(n_obs_steps, ...)``, single ``(A,)``
    actions) and a local policy: the simulator paced to wall-clock time. A starved tick does
    not step the simulator (the robot holds; manipulation is quasi-static). After the run,
    ``info`` is the env's last info (``success``, ``steps``, ``error``)."""

    def __init__(self, env, policy, mode: str, obs_keys, n_action_steps: int, n_obs_steps: int):
        self.env, self.obs_keys = env, list(obs_keys)
        self.source = ChunkSource(policy, mode, n_action_steps, n_obs_steps)
        self.obs = None
        self.info: dict = {}

    def reset(self, seed: int | None = None) -> None:
        self.obs, self.info = self.env.reset(seed=seed)
        if self.info.get("error"):
            raise RuntimeError(self.info["error"])

    def observe(self) -> dict:
        import torch
        return {k: torch.from_numpy(np.ascontiguousarray(self.obs[k])[None]) for k in self.obs_keys}

    def infer(self, obs: dict, prefix: np.ndarray | None) -> np.ndarray:
        return self.source(obs, None if prefix is None else prefix[None])[0]

    def step(self, action: np.ndarray | None) -> bool:
        if action is None:
            return False
        self.obs, _, term, trunc, self.info = self.env.step(action)
        return bool(term or trunc)
