"""The robot-policy workload: observation encoders, ``ChunkPolicy`` (a Generator over action
chunks), ``PolicyTask`` and ``load_policy``."""

from __future__ import annotations

from pathlib import Path


def load_policy(run_dir_or_ckpt: str | Path, device: str = "cpu", use_ema: bool = True):
    """A ready :class:`~jumpflow.policy.chunk_policy.ChunkPolicy` from a run directory or a
    checkpoint file, without opening (or generating) its training data: shapes, keys, the
    normalizer, ``env_meta``, the objective and its inference settings all come from the
    checkpoint. The policy has ``env_meta``, ``obs_keys`` and ``task`` (for its evaluator)."""
    from jumpflow.checkpoint import CheckpointError, load_model

    model, _ = load_model(run_dir_or_ckpt, use_ema=use_ema, device=device)
    if not hasattr(model, "predict_action"):
        raise CheckpointError(f"{run_dir_or_ckpt} is not a policy checkpoint (task {type(model.task).__name__})")
    return model


__all__ = ["load_policy"]
