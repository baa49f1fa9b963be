"""The openpi-protocol policy server: the real openpi client gets the in-process actions; every
malformed request is answered by an error frame naming the key and serving goes on; several
clients at once. No simulator."""

from __future__ import annotations

import http.client
import threading

import numpy as np
import pytest

pytest.importorskip("msgpack")
pytest.importorskip("websockets")

SHAPES = {"object": (10,), "robot0_eef_pos": (3,), "agentview_image": (3, 4, 4)}
N_OBS, N_ACT, A = 2, 4, 7


class FakePolicy:
    """Deterministic actions from the observations: row i, dim a of robot b is
    ``sum(object[b]) * (i + 1) + a + eef[b, -1, 0] + mean(image[b]) / 255``."""

    obs_keys = list(SHAPES)  # noqa: RUF012  (mirrors a policy's attributes)
    obs_shapes = SHAPES
    n_obs_steps, n_action_steps, horizon, action_dim = N_OBS, N_ACT, 8, A
    env_meta = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}  # noqa: RUF012

    def __init__(self):
        self.calls = 0

    def predict_action(self, obs):
        import torch

        self.calls += 1
        for k, v in obs.items():
            assert isinstance(v, torch.Tensor) and v.shape[1] == N_OBS, k
        obj, eef = obs["object"].double(), obs["robot0_eef_pos"].double()
        if float(eef[0, -1, 1]) == 666.0:
            raise RuntimeError("the policy is unhappy")
        img = obs["agentview_image"].double().mean(dim=(1, 2, 3, 4)) / 255.0
        i = torch.arange(N_ACT, dtype=torch.float64)[None, :, None] + 1
        a = torch.arange(A, dtype=torch.float64)[None, None, :]
        base = obj.sum(dim=(1, 2))[:, None, None] * i + a + eef[:, -1, 0][:, None, None] + img[:, None, None]
        return base.float()                                                     # (B, N_ACT, A)


def _obs(seed: int, batch: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    lead = (N_OBS,) if batch is None else (batch, N_OBS)
    return {"object": rng.normal(size=lead + SHAPES["object"]).astype(np.float32),
            "robot0_eef_pos": rng.normal(size=lead + SHAPES["robot0_eef_pos"]).astype(np.float32),
            "agentview_image": rng.integers(0, 256, size=lead + SHAPES["agentview_image"], dtype=np.uint8),
            "prompt": "lift the cube"}                                           # ignored extra key


def _in_process(policy, obs: dict) -> np.ndarray:
    import torch
    batched = obs["object"].ndim == 3
    t = {k: torch.from_numpy(v if batched else v[None]) for k, v in obs.items() if k in SHAPES}
    out = policy.predict_action(t).numpy()
    return out if batched else out[0]


@pytest.fixture
def server():
    from jumpflow.serve import PolicyServer

    srv = PolicyServer(FakePolicy(), host="127.0.0.1", port=0, metadata={"note": "test"})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _raw_client(srv):
    from websockets.sync.client import connect

    from jumpflow.serve import unpackb
    ws = connect(f"ws://127.0.0.1:{srv.port}", compression=None, max_size=None)
    meta = unpackb(ws.recv())
    return ws, meta


def test_openpi_client_gets_the_in_process_actions(server):
    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    client = wcp.WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["obs_keys"] == list(SHAPES) and meta["n_action_steps"] == N_ACT and meta["n_obs_steps"] == N_OBS
    assert meta["obs_shapes"]["agentview_image"] == [3, 4, 4] and meta["control_freq"] == 20.0
    assert meta["env_meta"]["env_name"] == "Lift" and meta["note"] == "test"
    policy = FakePolicy()
    for seed in range(3):
        obs = _obs(seed)
        reply = client.infer(obs)
        assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (N_ACT, A)
        np.testing.assert_array_equal(reply["actions"], _in_process(policy, obs))
        assert reply["policy_timing"]["infer_ms"] >= 0.0
    batch = _obs(7, batch=3)
    np.testing.assert_array_equal(client.infer(batch)["actions"], _in_process(policy, batch))
    # an error frame makes the client raise; the same connection then still answers
    with pytest.raises(RuntimeError, match="missing observation key 'object'"):
        client.infer({"robot0_eef_pos": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(client.infer(_obs(9))["actions"], _in_process(policy, _obs(9)))


def test_codec_matches_openpi_msgpack_numpy():
    mn = pytest.importorskip("openpi_client.msgpack_numpy")
    from jumpflow.serve import packb, unpackb

    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float32(1.5), "c": {"d": np.ones(2, bool)},
           "e": [1, "x"]}
    for decoded in (unpackb(mn.packb(obj)), mn.unpackb(packb(obj))):
        np.testing.assert_array_equal(decoded["a"], obj["a"])
        assert decoded["a"].dtype == np.int16 and decoded["b"] == np.float32(1.5)
        assert decoded["c"]["d"].dtype == bool and list(decoded["e"]) == [1, "x"]


def _enc(arr: np.ndarray, **override) -> dict:
    d = {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}
    d.update({k.encode(): v for k, v in override.items()})
    return d


def test_malformed_requests_get_error_frames_and_serving_goes_on(server):
    import msgpack

    from jumpflow.serve import packb, unpackb

    ws, _ = _raw_client(server)
    good = _obs(1)

    def with_(key, value):
        obs = {k: v for k, v in good.items()}
        obs[key] = value
        return obs

    def raw(obj):
        return msgpack.packb(obj, use_bin_type=True, default=lambda a: _enc(a))

    nan = good["object"].copy()
    nan[1, 3] = np.nan
    cases = [
        ("hello", "binary msgpack frame"),                                           # text frame
        (b"\xc1\xc1\xc1", "not valid msgpack"),                                      # bytes, not msgpack
        (packb([1, 2, 3]), "msgpack map"),                                           # not a map
        (packb({k: v for k, v in good.items() if k != "robot0_eef_pos"}), "missing observation key 'robot0_eef_pos'"),
        (packb(with_("object", np.zeros((2, 9), np.float32))), "'object': shape [2, 9]"),
        (packb(with_("object", np.zeros((3, 10), np.float32))), "'object': shape [3, 10]"),
        (packb(with_("object", nan)), "'object': contains NaN"),
        (packb(with_("robot0_eef_pos", np.full((2, 3), np.inf, np.float32))), "'robot0_eef_pos': contains NaN or inf"),
        (packb(with_("object", "ten numbers")), "'object': expected a numeric array"),
        (packb(with_("agentview_image", good["agentview_image"].astype(np.float32))), "'agentview_image': images must be uint8"),
        (raw(with_("object", _enc(good["object"], dtype="|O"))), "'object': bad array encoding"),
        (raw(with_("object", _enc(good["object"], shape=[2, 11]))), "'object': bad array encoding"),
        (raw(with_("object", _enc(good["object"], dtype=5))), "'object': bad array encoding"),
        (packb(with_("object", np.zeros((1, 2, 10), np.float32))), "batched and unbatched observations mixed"),
        (packb(with_("robot0_eef_pos", np.array([[0, 666.0, 0]] * 2, np.float32))), "policy failed: RuntimeError"),
    ]
    for frame, expected in cases:
        ws.send(frame)
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str) and reply.startswith("error: "), (expected, reply)
        assert expected in reply, (expected, reply)
    ws.send(packb(good))
    reply = unpackb(ws.recv(timeout=10))
    np.testing.assert_array_equal(reply["actions"], _in_process(FakePolicy(), good))
    ws.close()


def test_several_clients_at_once(server):
    from jumpflow.serve import packb, unpackb

    policy, errors = FakePolicy(), []
    clients = [_raw_client(server)[0] for _ in range(4)]

    def work(i, ws):
        try:
            for r in range(15):
                obs = _obs(100 * i + r)
                ws.send(packb(obs))
                reply = ws.recv(timeout=20)
                np.testing.assert_array_equal(unpackb(reply)["actions"], _in_process(policy, obs))
        except Exception as e:                      # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i, ws)) for i, ws in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and server.policy.calls == 60
    for ws in clients:
        ws.close()


def test_health_check_and_shutdown_closes_clients(server):
    from websockets.exceptions import ConnectionClosed

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"OK\n"
    ws, _ = _raw_client(server)
    server.shutdown()
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)


def test_server_without_serving_shuts_down_and_cli_errors(tmp_path, capsys):
    from jumpflow.serve import PolicyServer, main

    srv = PolicyServer(FakePolicy(), port=0)
    assert srv.port > 0
    srv.shutdown()
    srv.shutdown()                                                           # idempotent
    assert main([str(tmp_path / "no_such_run"), "--port", "0"]) == 2
    assert "jumpflow-serve: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])


# ---------------------------------------------------------------------- prefix over the wire (rtc)
PH, PA, P_OBS, P_ACT, P_MAX = 8, 2, 2, 4, 3


def _chunk_policy():
    """A small untrained ChunkPolicy with prefix conditioning (MeanFlow, stochastic: the tests
    seed torch's global generator before each call, the server's thread uses the same one)."""
    import torch

    from jumpflow.backbones import build_backbone
    from jumpflow.normalizer import Normalizer
    from jumpflow.objectives import OBJECTIVES
    from jumpflow.policy.chunk_policy import ChunkPolicy
    from jumpflow.policy.encoders import ObsEncoder

    torch.manual_seed(0)
    encoder = ObsEncoder({"state": (3,)}, P_OBS, lowdim_mlp=0)
    cond_dim = encoder.out_dim + ChunkPolicy.prefix_cond_dim(P_MAX, PA)
    norm = Normalizer.fit({"action": np.linspace(-2, 2, 100, dtype=np.float32).reshape(50, PA),
                           "state": np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)})
    policy = ChunkPolicy(encoder, build_backbone("MLP", (PH, PA), cond_dim, width=32, depth=2),
                         OBJECTIVES["meanflow"](), norm, PH, P_OBS, P_ACT, PA, prefix_max=P_MAX)
    return policy.eval()


@pytest.fixture
def chunk_server():
    from jumpflow.serve import PolicyServer

    srv = PolicyServer(_chunk_policy(), host="127.0.0.1", port=0, obs_keys=["state"], obs_shapes={"state": (3,)})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=10)


def test_openpi_client_prefix_request_gets_the_in_process_chunk(chunk_server):
    """A request with ``prefix`` (and ``prefix_len``) is answered with the future rows of
    ``predict_chunk(obs, prefix, prefix_len)``, exactly the in-process chunk for the same noise;
    its first ``prefix_len`` rows are the committed actions. Zero rows: the plain whole chunk;
    no prefix field: ``predict_action`` as before."""
    import torch

    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    client = wcp.WebsocketClientPolicy("127.0.0.1", chunk_server.port)
    meta = client.get_server_metadata()
    assert meta["prefix_max"] == P_MAX and meta["chunk_steps"] == PH - P_OBS + 1
    policy, start = chunk_server.policy, P_OBS - 1
    rng = np.random.default_rng(0)

    def both(obs, prefix=None, prefix_len=None, **extra):
        req = {"state": obs, **extra}
        if prefix is not None:
            req["prefix"] = prefix
        if prefix_len is not None:
            req["prefix_len"] = prefix_len
        torch.manual_seed(11)
        remote = client.infer(req)["actions"]
        batched = obs.ndim == 3
        obs_t = {"state": torch.from_numpy(obs if batched else obs[None])}
        torch.manual_seed(11)
        if prefix is None:
            local = policy.predict_action(obs_t).numpy()
        else:
            pre = torch.from_numpy(np.asarray(prefix, np.float32).reshape((obs_t["state"].shape[0], -1, PA)))
            m = pre.shape[1] if prefix_len is None else prefix_len
            local = (policy.predict_chunk(obs_t, prefix=pre, prefix_len=m) if m else
                     policy.predict_chunk(obs_t)).numpy()[:, start:]
        return remote, (local if batched else local[0])

    for m in (1, 2, 3):                                            # unbatched, every prefix length
        obs = rng.normal(size=(P_OBS, 3)).astype(np.float32)
        prefix = rng.uniform(-1.5, 1.5, size=(m, PA)).astype(np.float32)
        remote, local = both(obs, prefix)
        assert remote.shape == (PH - P_OBS + 1, PA) and remote.dtype == np.float32
        np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(remote[:m], prefix)
    obs = rng.normal(size=(3, P_OBS, 3)).astype(np.float32)       # batched, prefix_len < m
    prefix = rng.uniform(-1.5, 1.5, size=(3, 3, PA)).astype(np.float32)
    remote, local = both(obs, prefix, prefix_len=np.int64(1))
    assert remote.shape == (3, PH - P_OBS + 1, PA)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(remote[:, :1], prefix[:, :1])
    obs = rng.normal(size=(P_OBS, 3)).astype(np.float32)
    remote, local = both(obs, np.zeros((0, PA), np.float32))       # zero rows: the plain whole chunk
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    remote, local = both(obs)                                      # no prefix: predict_action, as before
    assert remote.shape == (P_ACT, PA)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)


def test_malformed_prefix_gets_error_frames_and_serving_goes_on(chunk_server, server):
    from jumpflow.serve import packb, unpackb

    ws, _ = _raw_client(chunk_server)
    obs = np.zeros((P_OBS, 3), np.float32)
    good = np.ones((2, PA), np.float32)
    nan = good.copy()
    nan[1, 0] = np.nan
    cases = [
        ({"prefix": np.ones((2, PA + 1), np.float32)}, "'prefix': shape [2, 3]"),
        ({"prefix": np.ones((1, 2, PA), np.float32)}, "'prefix': shape [1, 2, 2]"),          # batched prefix, unbatched obs
        ({"prefix": np.ones(PA, np.float32)}, "'prefix': shape [2]"),
        ({"prefix": nan}, "'prefix': contains NaN or inf"),
        ({"prefix": np.full((1, PA), np.inf, np.float32)}, "'prefix': contains NaN or inf"),
        ({"prefix": np.ones((P_MAX + 1, PA), np.float32)}, "'prefix': 4 rows, longer than the policy's prefix_max = 3"),
        ({"prefix": "two actions"}, "'prefix': expected a numeric array"),
        ({"prefix": np.ones((2, PA), bool)}, "'prefix': expected a numeric array"),
        ({"prefix": good, "prefix_len": 3}, "'prefix_len': 3 is outside [0, 2]"),
        ({"prefix": good, "prefix_len": -1}, "'prefix_len': -1 is outside [0, 2]"),
        ({"prefix": good, "prefix_len": 1.5}, "'prefix_len': expected an int"),
        ({"prefix_len": 1}, "'prefix_len' given without 'prefix'"),
    ]
    for extra, expected in cases:
        ws.send(packb({"state": obs, **extra}))
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str) and reply.startswith("error: "), (expected, reply)
        assert expected in reply, (expected, reply)
    batched = np.zeros((2, P_OBS, 3), np.float32)
    ws.send(packb({"state": batched, "prefix": np.ones((3, 1, PA), np.float32)}))              # batch of 3 for 2
    reply = ws.recv(timeout=10)
    assert isinstance(reply, str) and "'prefix': shape [3, 1, 2]" in reply, reply
    ws.send(packb({"state": obs, "prefix": good}))
    reply = unpackb(ws.recv(timeout=10))
    assert reply["actions"].shape == (PH - P_OBS + 1, PA)
    np.testing.assert_array_equal(reply["actions"][:2], good)
    ws.close()
    # a policy without predict_chunk (or without prefix training) says so by name
    ws, meta = _raw_client(server)
    assert meta["prefix_max"] == 0 and meta["chunk_steps"] is None
    ws.send(packb({**_obs(1), "prefix": np.ones((1, A), np.float32)}))
    reply = ws.recv(timeout=10)
    assert isinstance(reply, str) and "'prefix': this policy has no predict_chunk" in reply, reply
    ws.close()
