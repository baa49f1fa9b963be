"""Behaviour-mode metrics of rollouts against demonstrations (multimodal tasks).

Reference: the mode-coverage analyses of Behavior Transformers (Shafiullah et al. 2022: entropy of
the task sequences a policy completes on Block Push / Kitchen) and Diffusion Policy (Chi et al.
2023, Sec. 4: committing to one mode within an episode); the entropy ratio and the total-variation
distance are written here over the demos' own mode labels.

A *mode* is a string label (``"b0t1"`` on Block Push, ``"left"`` / ``"right"`` on ReachAround);
an episode that never committed to one has the mode ``None`` (the strings ``"none"`` and ``""``
mean the same and are counted as ``"none"``).

- :func:`mode_distribution`: frequencies ``{mode: share}`` (``"none"`` included when present).
- :func:`mode_entropy_ratio`: ``H(rollout) / H(demo)``, natural log, both over the demos' mode set:
  rollout episodes with no mode or with a mode the demos never show are left out of ``H(rollout)``
  (they count in :func:`mode_tv` and in the success rate). 1 = the rollouts spread over the
  demo modes as evenly as the demos do; 0 = one mode only (or no episode reached a demo mode).
- :func:`mode_tv`: total-variation distance ``0.5 * sum_m |p_rollout(m) - p_demo(m)|`` over every
  label seen, ``"none"`` included (a policy that never commits is far from the demos).
- :func:`mode_switches`: changes of the committed mode within one episode, from a per-step mode
  sequence (``None`` steps are skipped: ``None -> "a"`` is not a switch, ``"a" -> None -> "b"`` is one).
- :func:`read_demo_modes`: the ``mode`` attribute of every ``data/demo_<i>`` of a robomimic HDF5.
- :func:`mode_metrics`: all of the above in the field names of the benchmark rows
  (``mode_entropy_ratio``, ``mode_tv``, ``mode_switches``).

How an evaluator calls them: the gym env (``jumpflow.envs.gym_env``) reports ``info["mode"]`` (the
committed mode, or None) and ``info["mode_switches"]`` (per episode) on sims with
``current_mode()``; keep both in each episode's record, then
``mode_metrics([e["mode"] for e in episodes], read_demo_modes(dataset),
switches=[e["mode_switches"] for e in episodes])``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence

NO_MODE = "none"


def normalise_mode(mode) -> str:
    """``None`` / ``"none"`` / ``""`` -> ``"none"``; bytes are decoded; anything else -> ``str``."""
    if mode is None:
        return NO_MODE
    if isinstance(mode, bytes):
        mode = mode.decode()
    mode = str(mode)
    return NO_MODE if mode.strip().lower() in ("", NO_MODE) else mode


def mode_distribution(modes: Iterable) -> dict[str, float]:
    """``{mode: share of episodes}`` (sorted by mode; ``"none"`` for episodes without a mode).

    Raises ``ValueError`` on an empty list."""
    labels = [normalise_mode(m) for m in modes]
    if not labels:
        raise ValueError("mode_distribution: no episodes (empty mode list)")
    counts = Counter(labels)
    return {m: counts[m] / len(labels) for m in sorted(counts)}


def entropy(probs: Iterable[float]) -> float:
    """Shannon entropy in nats of a distribution (zeros ignored)."""
    return float(-sum(p * math.log(p) for p in probs if p > 0))


def _demo_support(demo_modes: Sequence) -> list[str]:
    support = sorted({normalise_mode(m) for m in demo_modes} - {NO_MODE})
    if not support:
        raise ValueError("demo modes: no demo has a mode (all are None / 'none')")
    return support


def mode_entropy_ratio(rollout_modes: Sequence, demo_modes: Sequence) -> float:
    """``H(rollout modes) / H(demo modes)`` over the demos' mode set (see the module docstring).

    Returns ``nan`` when the demos show a single mode (``H(demo) = 0``: the ratio is undefined)."""
    support = _demo_support(demo_modes)
    demo = Counter(normalise_mode(m) for m in demo_modes if normalise_mode(m) in support)
    h_demo = entropy(c / sum(demo.values()) for c in demo.values())
    if h_demo == 0.0:
        return float("nan")
    roll = Counter(normalise_mode(m) for m in rollout_modes if normalise_mode(m) in support)
    n = sum(roll.values())
    if n == 0:
        return 0.0
    return entropy(c / n for c in roll.values()) / h_demo


def mode_tv(rollout_modes: Sequence, demo_modes: Sequence) -> float:
    """Total-variation distance between the rollout and demo mode frequencies, in ``[0, 1]``."""
    p, q = mode_distribution(rollout_modes), mode_distribution(demo_modes)
    return 0.5 * sum(abs(p.get(m, 0.0) - q.get(m, 0.0)) for m in set(p) | set(q))


def mode_switches(mode_sequence: Iterable) -> int:
    """Number of times the committed mode changes along one episode's per-step mode sequence."""
    switches, last = 0, None
    for m in mode_sequence:
        m = normalise_mode(m)
        if m == NO_MODE:
            continue
        if last is not None and m != last:
            switches += 1
        last = m
    return switches


def final_mode(mode_sequence: Sequence):
    """The last committed mode of a per-step sequence (``None`` if it never committed)."""
    for m in reversed(list(mode_sequence)):
        if normalise_mode(m) != NO_MODE:
            return normalise_mode(m)
    return None


def mode_metrics(rollout_modes: Sequence, demo_modes: Sequence, switches: Sequence | None = None,
                 mode_sequences: Sequence[Sequence] | None = None) -> dict:
    """All mode metrics of one evaluation.

    Args:
        rollout_modes: one mode label per rollout episode (``None`` when it never committed).
        demo_modes: one mode label per demo (see :func:`read_demo_modes`).
        switches: per-episode switch counts (e.g. the gym env's ``info["mode_switches"]``), or
        mode_sequences: per-episode per-step mode sequences (switches are counted from them).
    Returns:
        ``{"mode_entropy_ratio", "mode_tv", "mode_switches" (mean per episode, None if neither
        switches nor sequences were given), "rollout_mode_freq", "demo_mode_freq", "n_no_mode"}``.
    """
    if switches is not None and mode_sequences is not None:
        raise ValueError("mode_metrics: give switches or mode_sequences, not both")
    if mode_sequences is not None:
        switches = [mode_switches(s) for s in mode_sequences]
    if switches is not None and len(switches) != len(rollout_modes):
        raise ValueError(f"mode_metrics: {len(switches)} switch counts for {len(rollout_modes)} episodes")
    return {
        "mode_entropy_ratio": mode_entropy_ratio(rollout_modes, demo_modes),
        "mode_tv": mode_tv(rollout_modes, demo_modes),
        "mode_switches": (sum(switches) / len(switches)) if switches else None,
        "rollout_mode_freq": mode_distribution(rollout_modes),
        "demo_mode_freq": mode_distribution(demo_modes),
        "n_no_mode": sum(normalise_mode(m) == NO_MODE for m in rollout_modes),
    }


def read_demo_modes(path: str | os.PathLike, filter_key: str | None = None) -> list[str]:
    """The ``mode`` attribute of each demo (``data/demo_<i>``, index order; ``filter_key``: only the
    demos of ``mask/<filter_key>``).

    Raises:
        jumpflow.datasets.robomimic.DatasetError: one line naming the file and the demo key when a
        demo has no ``mode`` attribute (and for every problem the robomimic reader reports).
    """
    from jumpflow.datasets.robomimic import DatasetError, RobomimicFile

    modes = []
    with RobomimicFile(path) as rf:
        for demo in rf.demo_names(filter_key):
            raw = rf.data[demo].attrs.get("mode")
            if raw is None:
                raise DatasetError(f"{rf.path}: data/{demo} has no 'mode' attribute; mode metrics need demos "
                                   "written with a mode (jumpflow-demos --task BlockPush / ReachAround)")
            modes.append(normalise_mode(raw))
    return modes
