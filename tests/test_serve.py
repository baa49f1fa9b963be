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

    obs_keys = list(SHAPES)
    obs_shapes = SHAPES
    n_obs_steps, n_action_steps, horizon, action_dim = N_OBS, N_ACT, 8, A
    env_meta = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}

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
