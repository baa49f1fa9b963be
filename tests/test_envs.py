"""Simulator, gym wrapper, scripted experts, demo writer (robomimic HDF5) and rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from robot_fixtures import LOWDIM


# ---------------------------------------------------------------------------- rendering selection
def test_gl_backend_respects_user_and_explains_missing_packages(monkeypatch):
    import jumpflow.envs.rendering as r

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert r.select_gl_backend() == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(r, "probe_backends", lambda: {"egl": None, "osmesa": None})
    assert r.select_gl_backend() is None
    with pytest.raises(r.RenderingUnavailableError, match="libosmesa6"):
        r.require_offscreen_rendering()


# ---------------------------------------------------------------------------- demo file layout
@pytest.mark.sim
def test_demo_file_is_robomimic_layout(lift_demos):
    import h5py

    with h5py.File(lift_demos, "r") as f:
        data = f["data"]
        meta = json.loads(data.attrs["env_args"])
        assert meta["env_name"] == "Lift" and meta["type"] == 1
        assert meta["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"
        names = sorted(data.keys())
        assert names == ["demo_0", "demo_1", "demo_2"]
        total = 0
        for n in names:
            g = data[n]
            t = int(g.attrs["num_samples"])
            total += t
            assert "<mujoco" in g.attrs["model_file"]
            assert g["actions"].shape == (t, 7) and np.abs(g["actions"][()]).max() <= 1.0
            assert g["states"].shape[0] == t and g["rewards"].shape == (t,) and g["dones"].shape == (t,)
            assert g["dones"][-1] == 1 and g["rewards"][-1] == 1.0
            for k in LOWDIM:
                assert g["obs"][k].shape[0] == t and g["next_obs"][k].shape[0] == t
            np.testing.assert_array_equal(g["obs/object"][1:], g["next_obs/object"][:-1])
        assert int(data.attrs["total"]) == total
        train = [x.decode() for x in f["mask/train"][()]]
        valid = [x.decode() for x in f["mask/valid"][()]]
        assert sorted(train + valid) == names and len(valid) == 1


@pytest.mark.sim
def test_demos_deterministic_by_seed_and_cli(tmp_path, lift_demos):
    import h5py

    from jumpflow.envs.demos import main

    out = tmp_path / "again.hdf5"
    assert main(["--task", "lift", "--n-demos", "2", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    assert main(["--task", "lift", "--n-demos", "2", "--out", str(out)]) == 2      # refuses to overwrite
    with h5py.File(out, "r") as a, h5py.File(lift_demos, "r") as b:
        for n in ("demo_0", "demo_1"):
            np.testing.assert_array_equal(a[f"data/{n}/actions"][()], b[f"data/{n}/actions"][()])
            np.testing.assert_array_equal(a[f"data/{n}/states"][()], b[f"data/{n}/states"][()])
    assert [p.name for p in tmp_path.iterdir()] == ["again.hdf5"]                  # no temp files left


@pytest.mark.sim
def test_failed_generation_leaves_no_file(tmp_path, monkeypatch):
    from jumpflow.envs import demos

    orig = demos.run_expert_episode
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return orig(*a, **k)

    monkeypatch.setattr(demos, "run_expert_episode", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        demos.generate_demos(tmp_path / "x.hdf5", "Lift", n_demos=3, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.sim
def test_ensure_demos_reuses_and_checks(lift_demos):
    from jumpflow.envs.demos import ensure_demos

    assert ensure_demos(lift_demos, "lift", n_demos=3) == lift_demos
    with pytest.raises(ValueError, match="holds task 'Lift'"):
        ensure_demos(lift_demos, "can", n_demos=3)
    with pytest.raises(ValueError, match="holds 3 demos"):
        ensure_demos(lift_demos, "lift", n_demos=10)


# ---------------------------------------------------------------------------- replay / determinism
@pytest.mark.sim
def test_replay_stored_actions_reproduces_states_and_success(lift_demos):
    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.sim import RobosuiteSim

    with RobomimicFile(lift_demos) as rf:
        sim = RobosuiteSim(rf.env_meta, obs_keys=LOWDIM)
        for demo in rf.demo_names():
            states, xml = rf.read_states(demo)
            actions = rf.data[demo]["actions"][()]
            stored_obs = rf.data[demo]["obs/object"][()]
            # the first demo reloads the stored scene XML, the others reset from states alone
            obs = sim.reset_to(states[0], xml if demo == "demo_0" else None)
            np.testing.assert_allclose(obs["object"], stored_obs[0], atol=1e-9)
            success = False
            for t, a in enumerate(actions):
                if t > 0:
                    np.testing.assert_allclose(sim.get_state()[1:], states[t][1:], atol=1e-4,
                                               err_msg=f"{demo} step {t}")
                _, _, success = sim.step(a)
            assert success, demo
        sim.close()


@pytest.mark.sim
def test_seeded_reset_fixes_initial_state():
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta

    sim = RobosuiteSim(default_env_meta("Lift"), obs_keys=LOWDIM)
    sim.reset(seed=3)
    s3 = sim.get_state()
    sim.reset(seed=4)
    s4 = sim.get_state()
    sim.step(np.ones(7))
    sim.reset(seed=3)
    np.testing.assert_array_equal(sim.get_state(), s3)
    assert not np.allclose(s3, s4)
    state = np.random.get_state()[1].copy()
    sim.reset(seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], state)   # caller's RNG untouched
    sim.close()


# ---------------------------------------------------------------------------- images
@pytest.mark.sim
def test_dataset_images_equal_render_and_are_upright(lift_image_demos):
    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.sim import RobosuiteSim

    with RobomimicFile(lift_image_demos) as rf:
        keys = rf.obs_keys()
        assert "agentview_image" in keys and "robot0_eye_in_hand_image" in keys
        imgs = rf.data["demo_0/obs/agentview_image"][()]
        states, _ = rf.read_states("demo_0")
        assert imgs.shape[1:] == (84, 84, 3) and imgs.dtype == np.uint8
        sim = RobosuiteSim(rf.env_meta, obs_keys=LOWDIM, image_keys=("agentview_image",), camera_size=84)
        for t in (0, len(states) // 2, len(states) - 1):
            obs = sim.reset_to(states[t])
            np.testing.assert_array_equal(obs["agentview_image"], imgs[t])
            np.testing.assert_array_equal(sim.render("agentview", 84, 84), imgs[t])
        # upright: world "up" is image "up". Lift the cube 25 cm in the state, render, and find the red
        # pixels where a pinhole projection (row 0 = top) puts it: rows well above the cube at rest
        env = sim.env
        cam = env.sim.model.camera_name2id("agentview")
        f = 42.0 / np.tan(np.deg2rad(env.sim.model.cam_fovy[cam]) / 2)
        qz = 1 + env.sim.model.get_joint_qpos_addr(env.cube.joints[0])[0] + 2      # cube z in the flat state
        rows_seen = []
        for dz in (0.0, 0.25):
            st = states[0].copy()
            st[qz] += dz
            sim.reset_to(st)
            pos = np.array(env.sim.data.cam_xpos[cam])
            rot = np.array(env.sim.data.cam_xmat[cam]).reshape(3, 3)
            p = rot.T @ (np.array(env.sim.data.body_xpos[env.cube_body_id]) - pos)   # camera looks along -z, y up
            row, col = 42.0 - f * p[1] / -p[2], 42.0 + f * p[0] / -p[2]
            img = sim.render("agentview", 84, 84).astype(int)
            red = (img[..., 0] > 40) & (img[..., 0] > 2 * img[..., 1]) & (img[..., 0] > 2 * img[..., 2])
            assert red.sum() > 5
            rows, cols = np.nonzero(red)
            assert abs(rows.mean() - row) < 4 and abs(cols.mean() - col) < 4
            rows_seen.append(rows.mean())
        assert rows_seen[1] < rows_seen[0] - 10                  # higher in the world -> higher in the image
        sim.close()


# ---------------------------------------------------------------------------- gym wrapper
@pytest.mark.sim
def test_gym_env_history_chunks_truncation_and_nan():
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.envs.sim import default_env_meta

    env = RobomimicGymEnv(default_env_meta("Lift"), LOWDIM, n_obs_steps=2, n_action_steps=4, max_steps=6)
    obs, info = env.reset(seed=11)
    assert set(obs) == set(LOWDIM) and obs["object"].shape == (2, 10) and obs["object"].dtype == np.float32
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs["robot0_eef_pos"][0], obs["robot0_eef_pos"][1])   # padded history
    chunk = np.zeros((4, 7), dtype=np.float32)
    chunk[:, 2] = 1.0                                                                     # move up
    obs, _, term, trunc, info = env.step(chunk)
    assert info["steps"] == 4 and not term and not trunc and not info["success"]
    assert obs["robot0_eef_pos"][1, 2] > obs["robot0_eef_pos"][0, 2]
    obs, _r, term, trunc, info = env.step(chunk)
    assert trunc and info["steps"] == 6                                                   # max_steps
    again = env.step(chunk)                                                               # no-op once done
    assert again[4]["steps"] == 6
    env.reset(seed=11)
    bad = chunk.copy()
    bad[1, 0] = np.nan
    _, _, term, _, info = env.step(bad)
    assert term and not info["success"] and "non-finite" in info["error"] and info["steps"] == 1
    env.close()


@pytest.mark.sim
def test_gym_env_images_uint8_channel_first():
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.envs.sim import default_env_meta

    env = RobomimicGymEnv(default_env_meta("Lift", image=True, camera_size=32),
                          ["robot0_eef_pos", "agentview_image"], n_obs_steps=2, n_action_steps=1, max_steps=3)
    obs, _ = env.reset(seed=0)
    assert obs["agentview_image"].shape == (2, 3, 32, 32) and obs["agentview_image"].dtype == np.uint8
    upright = env.sim.render("agentview", 32, 32)
    np.testing.assert_array_equal(np.moveaxis(obs["agentview_image"][1], 0, -1), upright)
    env.close()


@pytest.mark.sim
def test_torch_compiler_stack_loads_after_rendering():
    """Rendering first, then the first torch op that imports torch._dynamo (and triton): this
    order segfaulted (Mesa's LLVM vs libtriton's) before envs.rendering preloaded triton."""
    import subprocess
    import sys

    code = ("from jumpflow.envs.sim import RobosuiteSim, default_env_meta\n"
            "sim = RobosuiteSim(default_env_meta('Lift'), obs_keys=['robot0_eef_pos'], "
            "image_keys=['agentview_image'], camera_size=32)\n"
            "assert sim.reset(seed=0)['agentview_image'].std() > 0\n"
            "import torch._dynamo\n"
            "sim.close()\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------------------- experts
@pytest.mark.sim
@pytest.mark.parametrize("task", ["can", "square"])
def test_expert_succeeds_once(task):
    """One seeded episode per task (the 100-seed figures are in bench/results/experts.json)."""
    from jumpflow.envs.demos import run_expert_episode
    from jumpflow.envs.experts import make_expert
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta

    sim = RobosuiteSim(default_env_meta(task))
    ep = run_expert_episode(sim, make_expert(task, sim.env), seed=0, max_steps=400)
    assert ep["success"] and ep["actions"].shape[0] < 300
    assert np.abs(ep["actions"]).max() <= 1.0
    sim.close()
