"""The one atomic writer (jumpflow.io): a writer killed with SIGKILL mid-write leaves no
half-written target, and the next writer of the same target removes the dead writer's
temporary file; live writers' temporary files are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jumpflow.io import (
    atomic_directory,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    temp_path,
)

SLOW_WRITER = """
import sys, time
from pathlib import Path
from jumpflow.io import atomic_write
def write(tmp):
    Path(tmp).write_bytes(b"half" * 1000)
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def test_kill_9_leaves_no_target_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "demos.hdf5"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(temps) == 1 and temps[0].suffix == ".hdf5"        # the suffix is kept (h5py, numpy pick by it)
    assert remove_stale_temps(target) == []                       # the writer is alive: left alone
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not target.exists() and temps[0].exists()
    atomic_write_text(target, "complete")
    assert target.read_text() == "complete" and not temps[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demos.hdf5"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "stats.npz"
    atomic_save_npz(path, mu=np.arange(3))
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(tmp_path / "r.json", {"x": float("nan")})
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(RuntimeError):
        from jumpflow.io import atomic_write

        def half_then_crash(tmp):
            open(tmp, "wb").write(b"half")  # noqa: SIM115  (left open on purpose: a crash mid-write)
            raise RuntimeError("disk full")
        atomic_write(path, half_then_crash)
    with np.load(path) as f:
        assert f["mu"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_atomic_directory_renames_on_success_only(tmp_path):
    out = tmp_path / "cache.zarr"
    with pytest.raises(KeyError), atomic_directory(out) as tmp:
        (tmp / "part").mkdir(parents=True)
        raise KeyError("bad demo")
    assert not out.exists() and not temp_path(out).exists()
    with atomic_directory(out) as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps({"ok": True}))
    assert json.loads((out / "meta.json").read_text()) == {"ok": True}
    assert not temp_path(out).exists()


def test_stale_temp_of_another_target_is_not_touched(tmp_path):
    other = tmp_path / ".other.tmp-999999.json"
    other.write_text("{}")
    dead = tmp_path / ".mine.tmp-999999.json"
    dead.write_text("{}")
    time.sleep(0.01)
    removed = remove_stale_temps(tmp_path / "mine.json")
    assert removed == [dead] and other.exists()
