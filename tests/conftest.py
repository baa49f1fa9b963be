"""Session fixtures: scripted demos generated once per test session (helpers: robot_fixtures.py)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker (torch, and the processes tests start): two workers on two
    # cores, not four OpenMP threads spinning against each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def lift_demos(tmp_path_factory):
    """3 scripted Lift demos (low-dim), seeds 0, 1, 2."""
    from jumpflow.envs.demos import generate_demos

    path = tmp_path_factory.mktemp("lift") / "lift3.hdf5"
    generate_demos(path, "Lift", n_demos=3, seed=0, progress=False)
    return path


@pytest.fixture(scope="session")
def lift_image_demos(tmp_path_factory):
    """1 scripted Lift demo with 84x84 agentview and eye-in-hand images."""
    from jumpflow.envs.demos import generate_demos

    path = tmp_path_factory.mktemp("lift_img") / "lift_img.hdf5"
    generate_demos(path, "Lift", n_demos=1, seed=7, image=True, progress=False)
    return path
