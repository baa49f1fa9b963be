"""Improved precision / recall and the within-class spread ratio (jumpflow.eval.diversity)."""

import numpy as np
import pytest

from jumpflow.eval.diversity import class_spread_ratio, precision_recall


def col(*v):
    return np.asarray(v, dtype=np.float64)[:, None]


def test_precision_recall_by_hand_in_one_dimension():
    # real radii (k=1): 1 each; fake radii: 0.1, 0.1, 9.4
    # precision: 0.5 and 0.6 lie within 1 of a real point, 10 does not -> 2/3
    # recall: 0 is 0.5 from the fake at 0.5 (radius 0.1) and 10 from the one at 10 (radius 9.4) -> out;
    # 1, 2, 3 lie within 9.4 of 10 -> 3/4
    p, r = precision_recall(col(0, 1, 2, 3), col(0.5, 0.6, 10.0), k=1)
    assert p == pytest.approx(2 / 3, abs=1e-12) and r == pytest.approx(0.75, abs=1e-12)


def brute_force(real, fake, k):
    def radii(s):
        d = np.sqrt(((s[:, None, :] - s[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def inside(q, s, rad):
        d = np.sqrt(((q[:, None, :] - s[None, :, :]) ** 2).sum(-1))
        return (d <= rad[None, :]).any(1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equals_the_definition_across_blocks(k):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(45, 3)) * 0.6 + 0.4
    want = brute_force(real, fake, k)
    assert precision_recall(real, fake, k=k, block=7) == pytest.approx(want, abs=1e-12)
    assert 0.0 < want[1] < 1.0 and want != brute_force(real, fake, k + 1)   # the case is not degenerate


def test_a_collapsed_generator_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    fake = np.repeat(real[:1], 50, axis=0)          # one real sample, 50 times: every fake radius is 0
    p, r = precision_recall(real, fake, k=3)
    assert p == 1.0 and r == pytest.approx(1 / 200, abs=1e-12)
    p_same, r_same = precision_recall(real, real.copy(), k=3)
    assert p_same == 1.0 and r_same == 1.0


def test_class_spread_ratio_closed_form():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 5)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    labels = np.arange(300) % 3
    fake = real.copy()
    scale = {0: 0.5, 1: 1.0, 2: 0.1}              # shrink each class about its own mean
    for c, s in scale.items():
        m = real[labels == c].mean(0)
        fake[labels == c] = m + s * (real[labels == c] - m) + 7.0     # a shift does not change the spread
    want = np.mean([s**2 for s in scale.values()])                   # (0.25 + 1 + 0.01) / 3
    assert class_spread_ratio(fake, labels, real, labels) == pytest.approx(want, rel=1e-12)
    # only the classes the generator drew are averaged
    keep = labels != 2
    assert class_spread_ratio(fake[keep], labels[keep], real, labels) == pytest.approx(0.625, rel=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: precision_recall(col(0, 1, 2), col(0, np.nan, 1)), "NaN"),
    (lambda: precision_recall(np.zeros((5, 2)), np.zeros((5, 3))), "feature sizes differ"),
    (lambda: precision_recall(col(0, 1, 2), col(0, 1, 2), k=3), "k = 3"),
    (lambda: precision_recall(np.zeros(5), col(0, 1)), r"\(N >= 2, D\)"),
    (lambda: class_spread_ratio(col(0, 1, 2), [0, 0, 1], col(0, 1, 2, 3), [0, 0, 1, 1]), "class 1 has 1 fake"),
    (lambda: class_spread_ratio(col(0, 1, 2), [0, 0], col(0, 1), [0, 0]), "2 / 2 labels for 3 fake"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
