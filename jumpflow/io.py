"""Atomic writes, written once and used everywhere (checkpoints, datasets, caches, results,
images, videos, zarr folders).

Every writer fills a temporary path beside its target (``.<name>.tmp-<pid><suffix>``: the
suffix is kept because numpy, imageio, PIL and h5py pick formats by it), fsyncs it and
renames it onto the target, so a reader sees the old file or the new one, never half of one.
On an exception the temporary path is removed. A process killed with ``kill -9`` cannot
clean up, so every writer first removes the temporary paths that earlier writers of the
same target left behind when their process is no longer alive (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")


def temp_path(path: str | os.PathLike) -> Path:
    """This process's temporary path for ``path`` (same folder, same suffix)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary paths of ``path`` left by writers whose process is gone; returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for cand in path.parent.iterdir():
        m = _TEMP.match(cand.name)
        if not m or f"{m.group('name')}{m.group('suffix') or ''}" != path.name:
            continue
        if pid_alive(int(m.group("pid"))):
            continue
        if cand.is_dir() and not cand.is_symlink():
            shutil.rmtree(cand, ignore_errors=True)
        else:
            cand.unlink(missing_ok=True)
        removed.append(cand)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced and renamed onto
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp: ...`` builds a folder (a zarr store) at ``tmp`` and
    renames it onto ``out`` when the block succeeds. If ``out`` appeared meanwhile (another
    process finished first) theirs is kept unless ``replace``. On error ``tmp`` is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if replace and path.exists():
            _remove(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        _remove(tmp)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    text = json.dumps(obj, indent=indent, allow_nan=False)    # NaN is not JSON: fail before writing
    return atomic_write_text(path, text + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_save_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """``image``: ``(H, W)`` or ``(H, W, 3|4)`` uint8; the format follows the suffix (PNG)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W[, C]) uint8, got {image.shape} {image.dtype}")
    img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return atomic_write(path, lambda tmp: img.save(tmp))


def atomic_write_video(path: str | os.PathLike, frames, fps: int = 20) -> Path:
    """``frames``: ``(T, H, W, 3)`` uint8 -> MP4 (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    frames = list(frames)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    return atomic_write(path, lambda tmp: imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1))
