"""How much the official affinity floor changes the drift field, by group width.

Drifting's official code floors the kernel at ``A = sqrt(max(softmax_row * softmax_col, 1e-6))``
(Deng et al. 2026, ``drift_loss.py``). A softmax over ``M`` columns puts about ``1/M`` on a
typical pair, so the floor (``1e-3`` after the square root) lifts more pairs the wider the group
is, and every lifted pair pulls toward the mean of all positives and pushes from the mean of all
generated samples, whatever their distance. This script measures, at the fixed point the
field should vanish at (generated samples drawn from the data law), the field with the floor
against the field without it, in the regimes jumpflow trains:

- ``toy``: the 2-D toys (``bench/toy2d``): one unconditional group, 256 generated and 256 data.
- ``policy``: 256 observations, 8 generated chunks and 1 positive each (``group_by: sample``,
  a 16 x 7 chunk).
- ``class``: 10 class groups of 64 generated and 26 data (images-like, d = 64).

    python -m bench.drift_floor

Rows: cosine between the two fields, the floored field's norm over the unfloored one's (before
each temperature's rms normalisation), and the share of pairs whose affinity the floor lifts.
Writes ``bench/results/drift_floor.json``.
"""

from __future__ import annotations

import math

import torch

from bench.common import arg_parser, parse_args, write_results
from jumpflow.datasets.toy2d import sample_toy2d
from jumpflow.drift import drift_field, log_pair_products

FLOOR = 1e-6
TEMPERATURES = (0.02, 0.05, 0.2)


def regimes(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (gen (Gr, G, d), pos (Gr, P, d))`` at the fixed point (gen ~ data law)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("gaussian_mixture", "checkerboard"):
        pos, _ = sample_toy2d(name, 256, seed=seed)
        gen, _ = sample_toy2d(name, 256, seed=seed + 1)
        out[f"toy/{name}"] = gen[None], pos[None]                               # (1, 256, 2)
    centre = torch.randn(256, 1, 112, generator=g)                               # one mode an observation
    out["policy"] = (centre + 0.1 * torch.randn(256, 8, 112, generator=g),
                     centre + 0.1 * torch.randn(256, 1, 112, generator=g))       # (256, 8, 112), (256, 1, 112)
    centre = 3 * torch.randn(10, 1, 64, generator=g)                             # one cluster a class
    out["class"] = (centre + torch.randn(10, 64, 64, generator=g), centre + torch.randn(10, 26, 64, generator=g))
    return out


def lifted_share(gen: torch.Tensor, pos: torch.Tensor, tau: float) -> float:
    """Share of valid (gen, target) pairs whose ``softmax_row * softmax_col`` is below the floor,
    at one temperature, with the kernel's own masks and batch distance scale."""
    log_prod, valid = log_pair_products(gen.double(), pos.double(), tau)      # (Gr, G, M), (Gr, G, M)
    return float((log_prod[valid] < math.log(FLOOR)).double().mean())


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, argv)
    rows = []
    for name, (gen, pos) in regimes(args.seed).items():
        for tau in TEMPERATURES:
            with_floor = drift_field(gen.double(), pos.double(), temperatures=(tau,), impl="torch",
                                     normalize=False, floor=FLOOR)                    # (Gr, G, d)
            without = drift_field(gen.double(), pos.double(), temperatures=(tau,), impl="torch",
                                  normalize=False, floor=0.0)
            cos = torch.nn.functional.cosine_similarity(with_floor.flatten(), without.flatten(), dim=0)
            rows.append({"regime": name, "groups": gen.shape[0], "gen": gen.shape[1], "pos": pos.shape[1],
                         "columns": gen.shape[1] + pos.shape[1], "tau": tau, "cosine": float(cos),
                         "norm_ratio": float(with_floor.norm() / without.norm()),
                         "pairs_lifted": lifted_share(gen, pos, tau)})
    write_results("drift_floor", {"floor": FLOOR, "seed": args.seed, "scale": "batch", "dtype": "float64"}, rows)


if __name__ == "__main__":
    main()
