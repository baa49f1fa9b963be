"""The folder -> import-name mapping works from a built wheel, outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.resources, importlib.util, json, sys
sys.path.insert(0, SITE)
import jumpflow, jumpflow.policy, jumpflow.datasets, jumpflow.configs, jumpflow.envs, jumpflow.eval
spec = importlib.util.find_spec("datasets")
out = {
    "jumpflow": jumpflow.__file__,
    "policy": jumpflow.policy.__file__,
    "datasets": jumpflow.datasets.__file__,
    "train_yaml": importlib.resources.files("jumpflow.configs").joinpath("train.yaml").is_file(),
    "objective_yaml": importlib.resources.files("jumpflow.configs").joinpath("objective/meanflow.yaml").is_file(),
    "bare_datasets": None if spec is None else spec.origin,
}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_wheel_installs_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("jumpflow-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = f"SITE = {str(site)!r}\n" + CHECK
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("jumpflow", "policy", "datasets"):
        assert out[key].startswith(str(site)), out
    assert out["policy"].endswith("jumpflow/policy/__init__.py")
    assert out["train_yaml"] and out["objective_yaml"]
    assert out["bare_datasets"] is None or "jumpflow" not in out["bare_datasets"]
    assert not (site / "datasets").exists() and not (site / "eval").exists() and not (site / "policy").exists()


def test_editable_mapping():
    import jumpflow.datasets
    import jumpflow.policy

    assert Path(jumpflow.datasets.__file__).parent == ROOT / "datasets"
    assert Path(jumpflow.policy.__file__).parent == ROOT / "policy"
