"""A closed-loop simulator rollout through the real ``openpi_client.WebsocketClientPolicy``:
``jumpflow-serve``'s server in this process, the rollout evaluator driving
:class:`jumpflow.serve.RemotePolicy` against it, and the same policy evaluated in process on
the same test seeds: the same executed actions, episode by episode, and the same success."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.sim

wcp = pytest.importorskip("openpi_client.websocket_client_policy")


class LeftAroundPolicy:
    """Reach Around's left-side oracle as a stateless policy: from the newest observation head
    for the waypoint left of the post until level with it, then for the goal (one action per
    request). It succeeds, so the comparison covers success, not only motion."""

    obs_keys = ["agent_pos", "goal_pos"]          # noqa: RUF012  (a policy's attributes)
    obs_shapes = {"agent_pos": [2], "goal_pos": [2]}  # noqa: RUF012
    n_obs_steps, n_action_steps, horizon, action_dim = 2, 1, 1, 2

    def __init__(self, env_meta):
        from jumpflow.envs.reach_around import POST_POS, WAYPOINT_X

        self.env_meta = env_meta
        self.waypoint = torch.as_tensor(POST_POS + np.array([-WAYPOINT_X, 0.0]), dtype=torch.float32)

    def reset(self):
        pass

    def predict_action(self, obs):
        p = obs["agent_pos"][:, -1].float()                                   # (B, 2)
        goal = obs["goal_pos"][:, -1].float()                                 # (B, 2)
        passed = (p[:, 1] >= self.waypoint[1]) | ((p - self.waypoint).norm(dim=1) < 0.03)
        aim = torch.where(passed[:, None], goal, self.waypoint.expand_as(p))   # (B, 2)
        delta = (aim - p) / 0.03
        delta = delta / delta.norm(dim=1, keepdim=True).clamp_min(1.0)        # at most one unit
        return delta[:, None].clamp(-1, 1)                                     # (B, 1, 2)


class Recording:
    """Wraps a policy and keeps every action block it returns (of a chunk: the rows from the
    newest observation's step on, the ones that can execute)."""

    def __init__(self, policy):
        self.policy, self.blocks = policy, []
        for name in ("obs_keys", "n_obs_steps", "n_action_steps", "env_meta"):
            setattr(self, name, getattr(policy, name))
        self.supports_prefix = bool(getattr(policy, "supports_prefix", False))
        if hasattr(policy, "predict_chunk"):
            self.predict_chunk = self._predict_chunk

    def reset(self):
        self.policy.reset()

    def predict_action(self, obs):
        out = self.policy.predict_action(obs)
        self.blocks.append(np.array(out, dtype=np.float32))
        return out

    def _predict_chunk(self, obs, prefix=None, prefix_len=None):
        out = self.policy.predict_chunk(obs, prefix=prefix, prefix_len=prefix_len)
        self.blocks.append(np.array(out[:, self.n_obs_steps - 1:], dtype=np.float32))
        return out


def serve(policy):
    from jumpflow.serve import PolicyServer

    srv = PolicyServer(policy, host="127.0.0.1", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def rollout(policy, env_meta, episodes, max_steps=60, policy_seed=None, mode="sync", delay=0):
    """``policy`` rolled out on Reach Around's test seeds -> (evaluator result, its action blocks)."""
    from jumpflow.eval.rollout import RolloutEvaluator

    recording = Recording(policy)
    ev = RolloutEvaluator(env_meta, n_episodes=episodes, max_steps=max_steps, n_obs_steps=policy.n_obs_steps,
                          n_action_steps=policy.n_action_steps, obs_keys=policy.obs_keys, policy_seed=policy_seed,
                          mode=mode, delay=delay)
    try:
        result = ev.run(recording)
    finally:
        ev.close()
    return result, recording.blocks


def outcomes(result):
    return [(e["success"], e["length"], e["max_reward"]) for e in result["episodes"]]


def test_openpi_client_rollout_reproduces_the_in_process_rollout():
    from jumpflow.envs.registry import planar_env_meta
    from jumpflow.serve import RemotePolicy

    env_meta = planar_env_meta("ReachAround")
    policy = LeftAroundPolicy(env_meta)
    local, local_blocks = rollout(policy, env_meta, episodes=3)
    srv = serve(policy)
    client = wcp.WebsocketClientPolicy("127.0.0.1", srv.port)
    try:
        remote_policy = RemotePolicy(client)
        assert remote_policy.obs_keys == policy.obs_keys and remote_policy.env_meta == env_meta
        assert not hasattr(remote_policy, "predict_chunk")               # the policy offers no chunks
        remote, remote_blocks = rollout(remote_policy, env_meta, episodes=3)
    finally:
        client._ws.close()
        srv.shutdown()
    assert local["success_rate"] == remote["success_rate"] == 1.0
    assert outcomes(local) == outcomes(remote)
    assert len(local_blocks) == len(remote_blocks) > 3 * 10
    for a, b in zip(local_blocks, remote_blocks):
        np.testing.assert_array_equal(a, b)


def test_openpi_client_rollout_of_a_trained_stochastic_policy_matches_in_process(tmp_path):
    """A trained (tiny) MeanFlow policy from its checkpoint, served: with the evaluator's policy
    seed the server thread draws the same noise as the in-process policy, so a sync rollout and
    an rtc rollout (chunks with the committed prefix over the wire) execute the same actions."""
    from hydra import compose, initialize_config_module

    from jumpflow.serve import RemotePolicy, load_serving_policy
    from jumpflow.trainer import train

    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            "experiment=policy_cpu", "task=reach_around_lowdim", f"task.dataset={tmp_path / 'reach.hdf5'}",
            "task.n_demos=6", f"task.cache_dir={tmp_path / 'cache'}", "task.prefix_max=2",
            "trainer.max_steps=4", "trainer.batch_size=16", "trainer.ckpt_every=4", "trainer.eval_at_end=false",
            "logger=none", "trainer.progress=false", "backbone.width=32", "backbone.depth=1",
            f"run_dir={tmp_path / 'run'}"])
    train(cfg)
    policy = load_serving_policy(str(tmp_path / "run"))
    srv = serve(policy)
    client = wcp.WebsocketClientPolicy("127.0.0.1", srv.port)
    try:
        remote_policy = RemotePolicy(client)
        assert remote_policy.supports_prefix and remote_policy.prefix_max == 2
        with pytest.raises(KeyError, match="goal_pos"):
            remote_policy.predict_action({"agent_pos": torch.zeros(1, 2, 2)})
        for mode, delay in (("sync", 0), ("rtc", 2)):
            (local, local_blocks), (remote, remote_blocks) = (
                rollout(p, policy.env_meta, episodes=2, max_steps=20, policy_seed=0, mode=mode, delay=delay)
                for p in (policy, remote_policy))
            assert outcomes(local) == outcomes(remote), mode
            assert len(local_blocks) == len(remote_blocks) >= 4, mode
            for a, b in zip(local_blocks, remote_blocks):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=mode)
            # the draws differ between requests (a stochastic policy), so equality is not trivial
            assert not np.allclose(local_blocks[0], local_blocks[1])
    finally:
        client._ws.close()
        srv.shutdown()
