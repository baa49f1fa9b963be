"""Session fixtures: scripted demos generated once per test session (helpers: robot_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker (torch, and the processes tests start): two workers on two
    # cores, not four OpenMP threads spinning against each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def shared_file(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` once per test run, shared by the xdist workers: the first worker to take the
    lock writes the file, the others wait and reuse it (the workers' base temps share a parent
    that belongs to this run only). Without xdist: this session's own temp directory."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(Path(name).stem) / name
        make(path)
        return path
    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    path = root / name
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            make(path)                  # generate_demos writes atomically: no half file is ever visible
    return path


@pytest.fixture(scope="session")
def lift_demos(tmp_path_factory):
    """3 scripted Lift demos (low-dim), seeds 0, 1, 2."""
    from jumpflow.envs.demos import generate_demos

    return shared_file(tmp_path_factory, "lift3.hdf5",
                       lambda path: generate_demos(path, "Lift", n_demos=3, seed=0, progress=False))


@pytest.fixture(scope="session")
def lift_image_demos(tmp_path_factory):
    """1 scripted Lift demo with 84x84 agentview and eye-in-hand images."""
    from jumpflow.envs.demos import generate_demos

    return shared_file(tmp_path_factory, "lift_img.hdf5",
                       lambda path: generate_demos(path, "Lift", n_demos=1, seed=7, image=True, progress=False))
