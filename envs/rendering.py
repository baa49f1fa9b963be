"""Offscreen rendering backend selection for MuJoCo on machines without a display.

MuJoCo (and robosuite 1.4.1, which reads ``MUJOCO_GL`` once, when
``robosuite.utils.binding_utils`` is first imported) picks its OpenGL platform from the
``MUJOCO_GL`` environment variable. On a CPU-only Linux machine two work:

- ``egl``: EGL with Mesa's software device (package ``libegl1`` + ``libegl-mesa0``,
  Debian/Ubuntu), or a GPU driver's EGL;
- ``osmesa``: Mesa's off-screen rasteriser (package ``libosmesa6``).

:func:`select_gl_backend` must run before robosuite is imported; ``jumpflow.envs.sim`` calls
it at import. A user's own ``MUJOCO_GL`` is always respected. The probe only loads the shared
libraries (cheap); if neither loads, ``MUJOCO_GL`` is left unset so that low-dim simulation
still works, and :func:`require_offscreen_rendering` raises a :class:`RenderingUnavailableError`
that names the missing packages when an image observation or a video is asked for.

Native-library order: Mesa's software EGL driver loads its own LLVM when the first context is
made; importing triton's ``libtriton`` (which bundles another LLVM) after that segfaults the
process. torch imports triton lazily, on the first op that touches ``torch._dynamo``, which can
be the policy's first forward pass after the environment has rendered (``jumpflow-eval``, a
test order). :func:`preload_triton` imports it first (about 0.1 s) when it is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_INSTALL_HINT = ("install one of them: `apt-get install libegl1 libegl-mesa0` (EGL) or "
                 "`apt-get install libosmesa6` (OSMesa), or set MUJOCO_GL yourself")

_probe_result: dict[str, str | None] = {}


class RenderingUnavailableError(RuntimeError):
    """Raised when offscreen rendering is required but no OpenGL backend can be loaded."""


def _can_load(names: list[str]) -> str | None:
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    found = ctypes.util.find_library(names[0].split(".")[0].removeprefix("lib"))
    if found:
        try:
            ctypes.CDLL(found)
            return found
        except OSError:
            return None
    return None


def probe_backends() -> dict[str, str | None]:
    """Which offscreen backends have loadable libraries: ``{"egl": lib or None, "osmesa": lib or None}``."""
    if not _probe_result:
        _probe_result["egl"] = _can_load(["libEGL.so.1", "libEGL.so"])
        _probe_result["osmesa"] = _can_load(["libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"])
    return dict(_probe_result)


def preload_triton() -> bool:
    """Import triton (if installed) before any OpenGL context exists; see the module note."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_gl_backend() -> str | None:
    """Set ``MUJOCO_GL`` to ``egl`` or ``osmesa`` (in that order) if the user has not set it.

    Returns:
        The backend in use (``os.environ["MUJOCO_GL"]``), or ``None`` when none could be loaded.
    """
    preload_triton()
    current = os.environ.get("MUJOCO_GL")
    if current:
        return current
    libs = probe_backends()
    for backend in ("egl", "osmesa"):
        if libs[backend]:
            os.environ["MUJOCO_GL"] = backend
            # PyOpenGL must agree with MuJoCo on the platform
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
    return None


def require_offscreen_rendering() -> str:
    """Return the selected backend or raise :class:`RenderingUnavailableError` naming what to install."""
    backend = os.environ.get("MUJOCO_GL") or select_gl_backend()
    if backend in ("egl", "osmesa", "glx", "glfw", "cgl", "wgl"):
        if backend == "egl" and not probe_backends()["egl"]:
            raise RenderingUnavailableError(
                f"MUJOCO_GL=egl but libEGL.so.1 cannot be loaded; {_INSTALL_HINT}")
        if backend == "osmesa" and not probe_backends()["osmesa"]:
            raise RenderingUnavailableError(
                f"MUJOCO_GL=osmesa but libOSMesa cannot be loaded; {_INSTALL_HINT}")
        return backend
    raise RenderingUnavailableError(
        "offscreen rendering (camera observations / videos) needs an OpenGL backend, but neither "
        f"EGL (libEGL.so.1) nor OSMesa (libOSMesa.so) can be loaded; {_INSTALL_HINT}")
