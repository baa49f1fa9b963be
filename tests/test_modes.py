"""Mode metrics (entropy ratio, total variation, switches), demo mode labels, and the gym env's mode report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from robot_fixtures import write_synthetic_robomimic

DEMOS = ["b0t0"] * 10 + ["b0t1"] * 10 + ["b1t0"] * 10 + ["b1t1"] * 10


def test_entropy_ratio_and_tv_closed_form():
    from jumpflow.eval.modes import mode_distribution, mode_entropy_ratio, mode_metrics, mode_tv

    rollouts = ["b0t0"] * 6 + ["b1t1"] * 2 + [None, "none"]
    assert mode_distribution(rollouts) == {"b0t0": 0.6, "b1t1": 0.2, "none": 0.2}
    # over the demo modes: 6/8 and 2/8; demos uniform over 4 modes
    h_roll = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mode_entropy_ratio(rollouts, DEMOS) == pytest.approx(h_roll / math.log(4), abs=1e-12)
    # 0.5 * (|.6-.25| + |0-.25| + |0-.25| + |.2-.25| + |.2-0|) = 0.55
    assert mode_tv(rollouts, DEMOS) == pytest.approx(0.55, abs=1e-12)
    assert mode_entropy_ratio(DEMOS[::-1], DEMOS) == pytest.approx(1.0)
    assert mode_tv(DEMOS[::2], DEMOS) == pytest.approx(0.0)
    assert mode_entropy_ratio(["b0t1"] * 5, DEMOS) == 0.0                 # collapsed onto one mode
    assert mode_entropy_ratio([None, "x"], DEMOS) == 0.0                  # no demo mode reached
    assert mode_tv(["left"] * 4, ["right"] * 3) == pytest.approx(1.0)
    assert math.isnan(mode_entropy_ratio(["left"], ["left", "left"]))     # H(demo) = 0: undefined
    m = mode_metrics(rollouts, DEMOS, mode_sequences=[[None, "b0t0"]] * 9 + [["b0t0", "b1t1", "b0t0"]])
    assert m["mode_switches"] == pytest.approx(0.2) and m["n_no_mode"] == 2
    assert m["mode_tv"] == pytest.approx(0.55) and m["demo_mode_freq"]["b1t0"] == 0.25
    with pytest.raises(ValueError, match="3 switch counts for 10 episodes"):
        mode_metrics(rollouts, DEMOS, switches=[0, 1, 2])
    with pytest.raises(ValueError, match="no demo has a mode"):
        mode_entropy_ratio(["a"], [None, "none"])


def test_mode_switches_count_changes_of_the_committed_mode():
    from jumpflow.eval.modes import final_mode, mode_switches

    assert mode_switches([]) == 0
    assert mode_switches([None, None, "left", "left"]) == 0             # committing is not a switch
    assert mode_switches(["left", None, "right", "right", "left"]) == 2  # None steps are skipped
    assert mode_switches(["b0t1", "b1t0", "b0t1", "b1t0"]) == 3
    assert final_mode(["left", "right", None]) == "right" and final_mode([None, "none"]) is None


def test_read_demo_modes_and_missing_attribute(tmp_path):
    import h5py

    from jumpflow.datasets.robomimic import DatasetError
    from jumpflow.eval.modes import read_demo_modes

    path = tmp_path / "modes.hdf5"
    write_synthetic_robomimic(path, lengths=(3, 4, 5))
    with h5py.File(path, "a") as f:
        f["data/demo_0"].attrs["mode"] = "left"
        f["data/demo_2"].attrs["mode"] = np.bytes_(b"right")
    with pytest.raises(DatasetError) as e:
        read_demo_modes(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "data/demo_1" in msg and "'mode'" in msg and "\n" not in msg
    with h5py.File(path, "a") as f:
        f["data/demo_1"].attrs["mode"] = "left"
    assert read_demo_modes(path) == ["left", "left", "right"]
    assert read_demo_modes(path, filter_key="valid") == ["right"]


class _ScriptedModeSim:
    """A stand-in sim whose committed mode follows a script, one entry per step."""

    def __init__(self, modes):
        self.modes, self.t = list(modes), 0

    action_dim = 2

    def observe(self):
        return {"x": np.zeros(2)}

    def reset(self, seed=None):
        self.t = 0
        return self.observe()

    def step(self, action):
        self.t += 1
        return self.observe(), 0.0, False

    def current_mode(self):
        return self.modes[min(self.t, len(self.modes) - 1)]

    def render(self, *a):
        return np.zeros((4, 4, 3), np.uint8)

    def close(self):
        pass


def test_gym_env_reports_mode_and_switches_like_mode_switches(monkeypatch):
    from jumpflow.envs import registry
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.eval.modes import mode_switches

    script = [None, None, "left", "left", None, "right", "right", "left"]
    monkeypatch.setattr(registry, "make_sim", lambda *a, **k: _ScriptedModeSim(script))
    env = RobomimicGymEnv({"env_name": "Scripted", "type": "fake"}, obs_keys=["x"], n_obs_steps=1,
                          n_action_steps=len(script), max_steps=100)
    _, info = env.reset(seed=0)
    assert info["mode"] is None and info["mode_switches"] == 0
    _, _, _, _, info = env.step(np.zeros((len(script) - 1, 2)))
    assert info["mode"] == "left" and info["mode_switches"] == mode_switches(script) == 2
