"""The reproducibility bench's comparisons on hand-made checkpoints and episodes (exact answers)."""

import pytest
import torch

from bench.reproducibility import differing, main, max_tensor_difference, weights
from jumpflow.checkpoint import save_checkpoint


def _ckpt(folder, tensors):
    return save_checkpoint(folder, 1, tensors, {"note": "hand-made"}, keep=1)


def test_tensor_difference_is_exact_per_group_and_infinite_where_shapes_differ(tmp_path):
    base = {"model.w": torch.zeros(3, dtype=torch.float64), "ema.w": torch.ones(2), "optim.0.exp_avg": torch.zeros(4),
            "rng.torch_cpu": torch.zeros(8, dtype=torch.uint8)}
    moved = dict(base, **{"ema.w": torch.tensor([1.0, 1.25]), "model.w": torch.tensor([0.0, -0.5, 0.0],
                                                                                        dtype=torch.float64)})
    a, b = _ckpt(tmp_path / "a", base), _ckpt(tmp_path / "b", moved)
    assert max_tensor_difference(a, a) == {"ema": 0.0, "model": 0.0, "optim": 0.0, "rng": 0.0}
    diff = max_tensor_difference(a, b)
    assert diff == {"ema": 0.25, "model": 0.5, "optim": 0.0, "rng": 0.0}
    assert weights(diff) == 0.25 and weights({"model": 0.5}) == 0.5
    reshaped = _ckpt(tmp_path / "c", dict(base, **{"optim.0.exp_avg": torch.zeros(5)}))
    assert max_tensor_difference(a, reshaped)["optim"] == float("inf")
    missing = _ckpt(tmp_path / "d", {k: v for k, v in base.items() if k != "ema.w"})
    assert max_tensor_difference(a, missing)["ema"] == float("inf")


def test_differing_counts_episodes_whose_success_or_length_changed():
    a = [(True, 20), (False, 60), (True, 31)]
    assert differing(a, a) == 0
    assert differing(a, [(True, 21), (False, 60), (False, 31)]) == 2
    with pytest.raises(ValueError):
        differing(a, a[:2])


@pytest.mark.parametrize("argv, message", [(["--steps", "5"], "--steps"), (["--episodes", "0"], "--episodes"),
                                            (["--objective", "nope"], "--objective")])
def test_bad_arguments_stop_before_training(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        main([*argv, "--runs", str(tmp_path / "runs")])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
