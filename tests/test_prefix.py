"""Real-time chunking by prefix conditioning (ChunkPolicy.prefix_max): off means exactly the
plain policy; on, the committed prefix is an input and the new chunk continues it."""

from __future__ import annotations

import torch

from jumpflow.backbones import build_backbone
from jumpflow.normalizer import Normalizer
from jumpflow.objectives import OBJECTIVES
from jumpflow.policy.chunk_policy import ChunkPolicy
from jumpflow.policy.encoders import ObsEncoder

H, A, N_OBS, N_ACT = 8, 2, 2, 4


def _policy(objective, prefix_max: int, width: int = 64) -> ChunkPolicy:
    torch.manual_seed(0)
    encoder = ObsEncoder({"state": (3,)}, N_OBS, lowdim_mlp=0)
    cond_dim = encoder.out_dim + ChunkPolicy.prefix_cond_dim(prefix_max, A)
    norm = Normalizer.fit({"action": torch.linspace(-2, 2, 50)[:, None].expand(50, A).numpy(),
                           "state": torch.randn(50, 3).numpy()})
    return ChunkPolicy(encoder, build_backbone("MLP", (H, A), cond_dim, width=width, depth=2), objective, norm,
                       H, N_OBS, N_ACT, A, prefix_max=prefix_max)


def _batch(n: int, generator: torch.Generator) -> dict:
    """Chunks ``a * ramp``: the scale ``a = +-1`` (50/50) is the only randomness, so any executed
    action determines the remainder; the observation carries no information about ``a``."""
    a = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    ramp = torch.linspace(0.2, 1.6, H)[None, :, None].expand(n, H, A)
    return {"obs": {"state": torch.zeros(n, N_OBS, 3)}, "action": a[:, None, None] * ramp}


def test_prefix_off_is_the_plain_generator_path_bit_for_bit():
    policy = _policy(OBJECTIVES["meanflow"](), prefix_max=0)
    batch = _batch(16, torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    loss = policy.compute_loss(batch).loss
    torch.manual_seed(3)
    x = policy.normalize_data(batch["action"])
    reference = policy.objective.loss(policy, x, policy.encode(batch["obs"])).loss
    assert torch.equal(loss, reference)
    assert not policy.supports_prefix


def test_prefix_condition_layout():
    policy = _policy(OBJECTIVES["regression"](), prefix_max=3)
    pre = torch.arange(1, 7, dtype=torch.float32).reshape(1, 3, 2).expand(2, 3, 2)
    out = policy.prefix_condition(pre, torch.tensor([0, 2]))
    assert out.shape == (2, 3 * 2 + 3)
    assert torch.equal(out[0], torch.zeros(9))
    assert torch.equal(out[1], torch.tensor([1.0, 2, 3, 4, 0, 0, 1, 1, 0]))


def test_trained_policy_continues_every_prefix_length():
    """A policy trained with prefix_max = 3 on chunks whose remainder is a function of their
    prefix generates that remainder for prefixes of length 1..3 (within 0.1 in action units,
    the modes being 2 apart), and keeps the committed rows exactly."""
    policy = _policy(OBJECTIVES["regression"](), prefix_max=3)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    sched_steps = 600
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, sched_steps)
    for _ in range(sched_steps):
        loss = policy.compute_loss(_batch(64, g)).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    policy.eval()
    test = _batch(8, torch.Generator().manual_seed(7))
    start = N_OBS - 1
    for m in (1, 2, 3):
        prefix = test["action"][:, start:start + m]
        chunk = policy.predict_chunk(test["obs"], prefix=prefix, prefix_len=m)
        assert torch.equal(chunk[:, start:start + m], prefix)
        err = (chunk[:, start + m:] - test["action"][:, start + m:]).abs().max()
        assert err < 0.1, (m, float(err))
