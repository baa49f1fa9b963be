"""``jumpflow-serve``: a policy server speaking the openpi websocket protocol.

    jumpflow-serve runs/lift_mf --port 8000              # newest valid checkpoint, CPU
    jumpflow-serve runs/lift_mf --port 8000 --nfe 2 --host 0.0.0.0

Protocol (that of openpi's ``WebsocketClientPolicy``, package ``openpi-client``): on connect the
server sends one binary frame, a msgpack map of metadata (observation keys and per-step shapes,
``n_obs_steps``, ``n_action_steps``, ``horizon``, ``action_dim``, ``control_freq``, the
robomimic ``env_meta``). Each request is a binary frame holding a msgpack map of observations,
numpy arrays encoded as ``{"__ndarray__": true, "data": <bytes>, "dtype": <numpy dtype str>,
"shape": [...]}`` (numpy scalars as ``{"__npgeneric__": true, "data", "dtype"}``). Each
observation ``obs[key]`` is ``(n_obs_steps, *shape)`` (one robot; the reply's ``actions`` is
``(n_action_steps, A)``) or ``(B, n_obs_steps, *shape)`` (a batch; ``(B, n_action_steps, A)``),
raw, as the rollout evaluator gives them (images uint8 ``(3, H, W)``, upright); keys the policy
does not use are ignored. The reply is a binary frame, a msgpack map ``{"actions": float32
array, "policy_timing": {"infer_ms": float}}``. A request that cannot be served (not msgpack,
not a map, a missing key, a wrong shape or dtype, NaN or inf, the policy raising) is answered
by a text frame ``"error: ..."`` naming the key, and the connection goes on serving. No pickle:
arrays are rebuilt from raw bytes with an allow-list of dtypes.

Real-time chunking over the wire (optional request fields; ``prefix`` and ``prefix_len`` are
reserved names, never observation keys): ``"prefix"``, the raw actions already committed for
the next ``m`` control steps, ``(m, A)`` (or ``(B, m, A)`` with batched observations), ``m <=``
the metadata's ``prefix_max``, row ``j`` the action of step ``k + j`` where ``k`` is the step of
the newest observation; and ``"prefix_len"``, an int ``<= m`` (default ``m``) saying how many of
those rows count. A request with a ``prefix`` field is answered with the whole future part of the
chunk, ``actions: (chunk_steps, A)`` (``(B, chunk_steps, A)``), ``chunk_steps = horizon -
n_obs_steps + 1`` from the metadata, generated given the prefix (``policy.predict_chunk(obs,
prefix, prefix_len)``) with its first ``prefix_len`` rows equal to the prefix; row ``j`` is again
step ``k + j``. ``prefix`` with zero rows asks for the whole chunk without conditioning (plain
asynchronous execution; any policy with ``predict_chunk``); a non-empty prefix needs a policy
trained with prefix conditioning (``prefix_max > 0``). A prefix that is not a finite numeric array
of the right shape, is longer than ``prefix_max``, or a ``prefix_len`` outside ``[0, m]``, gets
an error frame naming ``prefix`` / ``prefix_len``.

Client side: :class:`RemotePolicy` wraps a client of this protocol (openpi's
``WebsocketClientPolicy``) as a policy for the rollout evaluator or the wall-clock controller.

Several clients are served at once (one thread per connection, ``websockets.sync.server``);
calls into the policy are serialised by a lock. ``GET /healthz`` answers ``200 OK``.
"""

from __future__ import annotations

import argparse
import http
import logging
import math
import sys
import threading
import time
from typing import Any

import numpy as np

logger = logging.getLogger("jumpflow.serve")

_ALLOWED_KINDS = "biuf"                # bool, signed / unsigned int, float: no object, void, complex
MAX_MESSAGE_BYTES = 64 * 2**20


class RequestError(ValueError):
    """A request the server answers with an error frame (the message names the key)."""


# ---------------------------------------------------------------------- msgpack + numpy codec
class _BadArray:
    """Placeholder for an array encoding that failed to decode; reported with its key later."""

    def __init__(self, reason: str):
        self.reason = reason


def _field(obj: dict, name: str):
    return obj[name.encode()] if name.encode() in obj else obj.get(name)


def _decode_hook(obj: dict) -> Any:
    """msgpack ``object_hook``: numpy arrays / scalars from openpi's map encoding."""
    is_array = b"__ndarray__" in obj or "__ndarray__" in obj
    is_scalar = b"__npgeneric__" in obj or "__npgeneric__" in obj
    if not (is_array or is_scalar):
        return obj
    try:
        dtype_str = _field(obj, "dtype")
        if isinstance(dtype_str, bytes):
            dtype_str = dtype_str.decode()
        if not isinstance(dtype_str, str):
            return _BadArray(f"dtype must be a string, got {type(dtype_str).__name__}")
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
            return _BadArray(f"dtype {dtype_str!r} is not allowed (numeric and bool only)")
        if is_scalar:
            return dtype.type(_field(obj, "data"))
        data, shape = _field(obj, "data"), _field(obj, "shape")
        if not isinstance(data, (bytes, bytearray)):
            return _BadArray("array data must be bytes")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            return _BadArray(f"array shape must be a list of non-negative ints, got {shape!r}")
        shape = tuple(shape)
        if len(data) != math.prod(shape) * dtype.itemsize:
            return _BadArray(f"array data has {len(data)} bytes, shape {shape} of {dtype_str} needs "
                             f"{math.prod(shape) * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        return _BadArray(f"{type(e).__name__}: {e}")


def _encode_default(obj: Any) -> Any:
    """msgpack ``default``: numpy arrays / scalars in openpi's map encoding."""
    if isinstance(obj, (np.ndarray, np.generic)) and (obj.dtype.kind not in _ALLOWED_KINDS or obj.dtype.hasobject):
        raise TypeError(f"cannot send numpy dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with numpy arrays (openpi's encoding)."""
    import msgpack
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The inverse of :func:`packb` (arrays come back read-only views of ``data``; a bad array
    encoding comes back as a placeholder that :meth:`PolicyServer.parse_request` reports)."""
    import msgpack
    return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=False)


# ---------------------------------------------------------------------- server
def policy_metadata(policy, obs_keys=None, obs_shapes=None, env_meta=None, control_freq: float | None = None) -> dict:
    """What the server sends on connect, from the policy's attributes (``obs_keys``,
    ``obs_shapes`` / its task's, ``env_meta``) and the arguments, which take precedence."""
    from jumpflow.eval.realtime import control_freq_of

    task = getattr(policy, "task", None)
    obs_keys = list(obs_keys or getattr(policy, "obs_keys", None) or getattr(task, "obs_keys", None) or [])
    obs_shapes = obs_shapes or getattr(policy, "obs_shapes", None) or getattr(task, "obs_shapes", None)
    env_meta = env_meta if env_meta is not None else getattr(policy, "env_meta", None)
    meta = {"server": "jumpflow", "obs_keys": obs_keys,
            "obs_shapes": {k: [int(x) for x in obs_shapes[k]] for k in obs_keys} if obs_shapes else None,
            "n_obs_steps": int(getattr(policy, "n_obs_steps", 1)),
            "n_action_steps": int(getattr(policy, "n_action_steps", 1)),
            "horizon": int(getattr(policy, "horizon", getattr(policy, "n_action_steps", 1))),
            "action_dim": int(getattr(policy, "action_dim", 0)) or None,
            "control_freq": float(control_freq) if control_freq else control_freq_of(env_meta),
            "env_meta": env_meta,
            "prefix_max": int(getattr(policy, "prefix_max", 0) or 0) if hasattr(policy, "predict_chunk") else 0,
            "chunk_steps": None}
    if hasattr(policy, "predict_chunk"):
        meta["chunk_steps"] = meta["horizon"] - meta["n_obs_steps"] + 1
    return meta


class PolicyServer:
    """Serve ``policy.predict_action`` over the openpi websocket protocol (see the module doc).

    Args:
        policy: ``predict_action(obs_dict) -> (B, n_action_steps, A)`` over torch tensors
            ``(B, n_obs_steps, ...)``; attributes ``n_obs_steps``, ``n_action_steps`` and
            (optional) ``obs_keys``, ``obs_shapes``, ``env_meta``, ``horizon``, ``action_dim``.
        host, port: where to listen (``port=0``: a free port, see :attr:`port`).
        metadata: extra entries of the metadata map sent on connect (they override the defaults
            of :func:`policy_metadata`).
        obs_keys: observation keys every request must hold (default: the policy's).
        obs_shapes: per-step shapes ``{key: shape}`` the requests are checked against (default:
            the policy's or its task's; None: only the history length and dtypes are checked).
        max_message_bytes: largest request accepted.

    Use ``serve_forever()`` (blocks; run it in a thread in-process) and ``shutdown()``.
    """

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, metadata: dict | None = None,
                 obs_keys=None, obs_shapes: dict | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        from websockets.sync.server import serve

        self.policy = policy
        self.metadata = policy_metadata(policy, obs_keys, obs_shapes)
        self.metadata.update(metadata or {})
        self.obs_keys = list(self.metadata.get("obs_keys") or [])
        if not self.obs_keys:
            raise ValueError("obs_keys: the policy has none; pass obs_keys=[...]")
        if {"prefix", "prefix_len"} & set(self.obs_keys):
            raise ValueError("obs_keys: 'prefix' and 'prefix_len' are reserved request fields")
        shapes = self.metadata.get("obs_shapes")
        self.obs_shapes = {k: tuple(shapes[k]) for k in self.obs_keys} if shapes else None
        self.n_obs_steps = int(self.metadata.get("n_obs_steps") or getattr(policy, "n_obs_steps", 1))
        self._lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._metadata_frame = packb(self.metadata)
        self._server = serve(self._handler, host, port, compression=None, max_size=max_message_bytes,
                             process_request=self._process_request)
        self.host = host
        self.port = int(self._server.socket.getsockname()[1])

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (call it from another thread)."""
        self._serving = True
        logger.info("jumpflow policy server on ws://%s:%d", self.host, self.port)
        self._server.serve_forever()

    def shutdown(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._server.shutdown()
        else:
            self._server.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _process_request(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    def parse_request(self, message) -> tuple[dict, bool]:
        """A frame -> ``({key: array (B, n_obs_steps, ...)}, batched)``; raises :class:`RequestError`.
        A request with a ``prefix`` field (see the module doc) also has ``out["prefix"]``, float32
        ``(B, m, A)``, and ``out["prefix_len"]``, an int."""
        if isinstance(message, str):
            raise RequestError("request must be a binary msgpack frame, got a text frame")
        try:
            obs = unpackb(message)
        except Exception as e:  # noqa: BLE001  (msgpack raises several types: ExtraData, FormatError, ValueError...)
            raise RequestError(f"request is not valid msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(obs, dict):
            raise RequestError(f"request must be a msgpack map of observations, got {type(obs).__name__}")
        out, batched, batch = {}, None, None
        for key in self.obs_keys:
            if key not in obs:
                raise RequestError(f"missing observation key {key!r} (expected keys {self.obs_keys})")
            v = obs[key]
            if isinstance(v, _BadArray):
                raise RequestError(f"observation {key!r}: bad array encoding: {v.reason}")
            if isinstance(v, (list, int, float)) and not isinstance(v, bool):
                try:
                    v = np.asarray(v, dtype=np.float32)
                except (TypeError, ValueError):
                    raise RequestError(f"observation {key!r}: not a numeric array") from None
            if not isinstance(v, np.ndarray) or v.dtype.kind not in _ALLOWED_KINDS:
                raise RequestError(f"observation {key!r}: expected a numeric array, got {type(v).__name__}")
            image = key.endswith("_image")
            per_step = self.obs_shapes[key] if self.obs_shapes else None
            if per_step is not None:
                if v.shape == (self.n_obs_steps, *per_step):
                    is_batched = False
                elif v.ndim == len(per_step) + 2 and v.shape[1:] == (self.n_obs_steps, *per_step):
                    is_batched = True
                else:
                    raise RequestError(f"observation {key!r}: shape {list(v.shape)}, expected "
                                       f"{[self.n_obs_steps, *per_step]} or [B, {self.n_obs_steps}, "
                                       f"{', '.join(map(str, per_step))}]")
            else:                                   # per-step ndim: 3 for images (3, H, W), 1 for low-dim
                base = 3 if image else 1
                if v.ndim == base + 1 and v.shape[0] == self.n_obs_steps:
                    is_batched = False
                elif v.ndim == base + 2 and v.shape[1] == self.n_obs_steps:
                    is_batched = True
                else:
                    raise RequestError(f"observation {key!r}: shape {list(v.shape)}, expected "
                                       f"[{self.n_obs_steps}, ...] or [B, {self.n_obs_steps}, ...] with "
                                       f"{base} per-step dims")
            if batched is not None and is_batched != batched:
                raise RequestError(f"observation {key!r}: batched and unbatched observations mixed")
            batched = is_batched
            v = v if is_batched else v[None]
            if batch is not None and v.shape[0] != batch:
                raise RequestError(f"observation {key!r}: batch of {v.shape[0]}, other keys have {batch}")
            batch = v.shape[0]
            if image:
                if v.dtype != np.uint8:
                    raise RequestError(f"observation {key!r}: images must be uint8, got {v.dtype}")
                out[key] = np.array(v)                                  # writable copy
            else:
                v = v.astype(np.float32)
                if not np.isfinite(v).all():
                    raise RequestError(f"observation {key!r}: contains NaN or inf")
                out[key] = v
        if batch == 0:
            raise RequestError("empty batch")
        if "prefix" in obs:
            out["prefix"], out["prefix_len"] = self._parse_prefix(obs["prefix"], obs.get("prefix_len"),
                                                                  bool(batched), batch)
        elif "prefix_len" in obs:
            raise RequestError("'prefix_len' given without 'prefix'")
        return out, bool(batched)

    def _parse_prefix(self, v, n, batched: bool, batch: int) -> tuple[np.ndarray, int]:
        """The ``prefix`` / ``prefix_len`` fields -> ``(float32 (B, m, A), prefix_len)``."""
        if not hasattr(self.policy, "predict_chunk"):
            raise RequestError("'prefix': this policy has no predict_chunk (whole chunks cannot be served)")
        prefix_max = int(self.metadata.get("prefix_max") or 0)
        a = self.metadata.get("action_dim")
        if isinstance(v, _BadArray):
            raise RequestError(f"'prefix': bad array encoding: {v.reason}")
        ndim = 3 if batched else 2
        if isinstance(v, (list, tuple)):
            try:
                v = np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                raise RequestError("'prefix': not a numeric array") from None
            if v.size == 0:
                v = v.reshape((batch, 0, 0) if batched else (0, 0))
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "iuf":
            got = f"dtype {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            raise RequestError(f"'prefix': expected a numeric array of actions, got {got}")
        want = f"[{batch}, m, {a}]" if batched else f"[m, {a}]"
        if (v.ndim != ndim or (batched and v.shape[0] != batch)
                or (a and v.shape[-1] != a and v.shape[-2] > 0)):
            raise RequestError(f"'prefix': shape {list(v.shape)}, expected {want} with m <= prefix_max = {prefix_max}")
        v = np.array(v if batched else v[None], dtype=np.float32)                 # (B, m, A), writable
        m = v.shape[1]
        if m > prefix_max:
            raise RequestError(f"'prefix': {m} rows, longer than the policy's prefix_max = {prefix_max}"
                               + (" (it was trained without prefix conditioning; send zero rows for a "
                                  "plain whole chunk)" if prefix_max == 0 else ""))
        if not np.isfinite(v).all():
            raise RequestError("'prefix': contains NaN or inf")
        if n is None:
            n = m
        elif isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise RequestError(f"'prefix_len': expected an int, got {type(n).__name__}")
        n = int(n)
        if not 0 <= n <= m:
            raise RequestError(f"'prefix_len': {n} is outside [0, {m}] (the prefix has {m} rows)")
        if n == 0:
            v = v[:, :0]
        return v, n

    def infer(self, obs: dict, batched: bool) -> dict:
        """The reply of a parsed request (the policy under the server's lock)."""
        import torch

        obs = dict(obs)
        prefix, prefix_len = obs.pop("prefix", None), obs.pop("prefix_len", 0)
        obs_t = {k: torch.from_numpy(v) for k, v in obs.items()}
        with self._lock:
            t0 = time.perf_counter()
            if prefix is None:
                out = self.policy.predict_action(obs_t)
            elif prefix_len > 0:
                out = self.policy.predict_chunk(obs_t, prefix=torch.from_numpy(prefix), prefix_len=prefix_len)
            else:
                out = self.policy.predict_chunk(obs_t)
            if hasattr(out, "detach"):
                out = out.detach().float().cpu().numpy()
            infer_ms = (time.perf_counter() - t0) * 1e3
        actions = np.asarray(out, dtype=np.float32)
        b = next(iter(obs.values())).shape[0]
        if prefix is not None:                         # the whole chunk: its future rows
            start = self.n_obs_steps - 1
            if actions.ndim != 3 or actions.shape[0] != b or actions.shape[1] <= start:
                raise RuntimeError(f"policy.predict_chunk returned shape {list(actions.shape)}, expected "
                                   f"[{b}, horizon, A]")
            actions = actions[:, start:]
        if actions.ndim != 3 or actions.shape[0] != b:
            raise RuntimeError(f"policy returned shape {list(actions.shape)}, expected [{b}, n_action_steps, A]")
        if not np.isfinite(actions).all():
            raise RuntimeError("policy produced non-finite actions")
        return {"actions": actions if batched else actions[0], "policy_timing": {"infer_ms": infer_ms}}

    def answer(self, message) -> bytes | str:
        """One frame in, one frame out: msgpack bytes, or an ``"error: ..."`` text frame."""
        try:
            obs, batched = self.parse_request(message)
        except RequestError as e:
            return f"error: {e}"
        try:
            return packb(self.infer(obs, batched))
        except Exception as e:                                     # the policy failed: say so, keep serving
            logger.exception("policy failed on a request")
            return f"error: policy failed: {type(e).__name__}: {e}"

    def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            ws.send(self._metadata_frame)
            while True:
                message = ws.recv()
                ws.send(self.answer(message))
        except ConnectionClosed:
            pass


# ---------------------------------------------------------------------- client side
class RemotePolicy:
    """A policy behind a server of this protocol, shaped like a local one for the rollout
    evaluator and the wall-clock controller: what a robot process runs against ``jumpflow-serve``.

    ``client`` is anything with ``get_server_metadata() -> dict`` and ``infer(obs) -> {"actions":
    ...}`` (openpi's ``WebsocketClientPolicy``; this module never imports openpi). Observations go
    out as numpy arrays ``(B, n_obs_steps, ...)`` (a batch, so the reply is ``(B, rows, A)``);
    ``predict_action`` returns ``(B, n_action_steps, A)``. Where the server offers chunks
    (``chunk_steps`` in its metadata) ``predict_chunk(obs, prefix, prefix_len)`` sends a
    ``prefix`` (zero rows without one) and returns ``(B, horizon, A)`` whose rows before
    ``n_obs_steps - 1`` (the observation history's past steps, never executed) are zeros;
    ``supports_prefix`` follows the server's ``prefix_max``.
    """

    def __init__(self, client):
        self.client = client
        meta = client.get_server_metadata()
        self.metadata = meta
        self.obs_keys = list(meta["obs_keys"])
        self.obs_shapes = meta.get("obs_shapes")
        self.n_obs_steps, self.n_action_steps = int(meta["n_obs_steps"]), int(meta["n_action_steps"])
        self.horizon = int(meta.get("horizon") or self.n_action_steps)
        self.env_meta = meta.get("env_meta")
        self.prefix_max = int(meta.get("prefix_max") or 0)
        self.supports_prefix = self.prefix_max > 0
        if meta.get("chunk_steps"):
            self.predict_chunk = self._predict_chunk

    def reset(self) -> None:
        reset = getattr(self.client, "reset", None)
        if callable(reset):
            reset()

    @staticmethod
    def _array(x) -> np.ndarray:
        """A tensor or array as a contiguous numpy array of its own dtype (images stay uint8)."""
        return np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x))

    def _request(self, obs: dict) -> dict:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation keys {missing} missing: the server's policy needs {self.obs_keys}")
        return {k: self._array(obs[k]) for k in self.obs_keys}                # (B, n_obs_steps, ...)

    def _actions(self, request: dict):
        import torch

        return torch.from_numpy(np.array(self.client.infer(request)["actions"], dtype=np.float32))

    def predict_action(self, obs: dict):
        """``obs[key]: (B, n_obs_steps, ...)`` -> ``(B, n_action_steps, A)`` float32 tensor."""
        return self._actions(self._request(obs))

    def _predict_chunk(self, obs: dict, prefix=None, prefix_len: int | None = None):
        import torch

        request = self._request(obs)
        b = next(iter(request.values())).shape[0]
        if prefix is None:
            prefix = np.zeros((b, 0, int(self.metadata.get("action_dim") or 0)), np.float32)
        request["prefix"] = self._array(prefix).astype(np.float32)
        if prefix_len is not None:
            request["prefix_len"] = int(prefix_len)
        future = self._actions(request)                                   # (B, chunk_steps, A)
        past = torch.zeros(future.shape[0], self.n_obs_steps - 1, future.shape[2])
        return torch.cat([past, future], dim=1)                           # (B, horizon, A)


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jumpflow-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run directory (newest valid checkpoint) or a checkpoint file")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--device", default="cpu", help="torch device of the policy")
    ap.add_argument("--nfe", type=int, default=None, help="network evaluations per chunk (default: the run's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--debug", action="store_true", help="load, answer one request from zeros in-process, exit")
    return ap


def load_serving_policy(checkpoint: str, device: str = "cpu"):
    """``jumpflow.policy.load_policy`` when it exists, else the checkpoint's module (``load_model``)."""
    try:
        from jumpflow.policy import load_policy
    except ImportError:
        load_policy = None
    if load_policy is not None:
        return load_policy(checkpoint, device=device)
    from jumpflow.checkpoint import load_model
    model, _ = load_model(checkpoint, device=device)
    return model


def zero_request(metadata: dict, batch: int | None = None) -> dict:
    """A well-formed request of zeros from the server's metadata (smoke tests, ``--debug``)."""
    t = metadata["n_obs_steps"]
    out = {}
    for k in metadata["obs_keys"]:
        shape = (t, *metadata["obs_shapes"][k]) if batch is None else (batch, t, *metadata["obs_shapes"][k])
        out[k] = np.zeros(shape, dtype=np.uint8 if k.endswith("_image") else np.float32)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        policy = load_serving_policy(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"jumpflow-serve: error: {e}", file=sys.stderr)
        return 2
    if not hasattr(policy, "predict_action"):
        print(f"jumpflow-serve: error: {args.checkpoint} is not a policy checkpoint", file=sys.stderr)
        return 2
    if args.nfe is not None:
        policy.set_inference(args.nfe)
    if getattr(policy, "temporal_ensemble", None) is not None:
        # the policy's own ensemble keeps one chunk tail for all clients: ensemble on the client side
        print("jumpflow-serve: temporal_ensemble is off while serving (run it client-side)", file=sys.stderr)
        policy.temporal_ensemble = None
    try:
        server = PolicyServer(policy, host=args.host, port=args.port)
    except OSError as e:
        print(f"jumpflow-serve: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"jumpflow-serve: error: {e}", file=sys.stderr)
        return 2
    if args.debug:
        reply = server.answer(packb(zero_request(server.metadata)))
        server.shutdown()
        if isinstance(reply, str):
            print(f"jumpflow-serve: {reply}", file=sys.stderr)
            return 1
        print(f"jumpflow-serve: ok, actions {list(unpackb(reply)['actions'].shape)}")
        return 0
    print(f"jumpflow-serve: serving {args.checkpoint} on ws://{args.host}:{server.port} "
          f"(keys {server.obs_keys}, n_obs_steps {server.n_obs_steps})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
