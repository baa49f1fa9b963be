"""bench/drift_floor: the share of pairs the official affinity floor lifts, against closed form."""

import pytest
import torch

from bench.drift_floor import FLOOR, lifted_share


@pytest.mark.parametrize("n, lifted", [(700, 0.0), (710, 1.0)])
def test_lifted_share_on_a_regular_simplex_matches_closed_form(n, lifted):
    # n generated and n positives at the vertices of a regular simplex (one-hot rows): every
    # valid pair is at the same distance, so a row's softmax is 1 / (2n - 1) (its self-pair left
    # out) and a column's 1 / n (positive) or 1 / (n - 1) (generated): the products cross the
    # floor 1e-6 between n = 700 (1.02e-6 and above) and n = 710 (9.93e-7 and 9.94e-7)
    eye = torch.eye(2 * n, dtype=torch.float64)
    pos, gen = eye[:n][None], eye[n:][None]                     # (1, n, 2n) each
    products = [1 / ((2 * n - 1) * n), 1 / ((2 * n - 1) * (n - 1))]
    assert all((p < FLOOR) == bool(lifted) for p in products)
    for tau in (0.02, 0.2):                                      # equal distances: tau does not matter
        assert lifted_share(gen, pos, tau) == lifted


def test_lifted_share_counts_only_far_pairs():
    # two far clusters: at a small temperature each row's softmax sits on its own cluster, so the
    # cross-cluster pairs fall below the floor and the near ones do not
    near = torch.tensor([[0.0, 0.0], [0.01, 0.0]], dtype=torch.float64)
    far = near + torch.tensor([100.0, 0.0], dtype=torch.float64)
    gen = torch.cat([near, far])[None]                           # (1, 4, 2)
    pos = torch.cat([near, far])[None] + 0.001                   # (1, 4, 2)
    share = lifted_share(gen, pos, 0.02)
    # per row: 7 valid columns (4 positives, 3 other generated), 4 of them in the other cluster
    assert share == pytest.approx(4 / 7)
