"""robosuite task names and their short aliases (no imports: the experts, the sim and the mode
reader all need them, and none of them may import another for it)."""

from __future__ import annotations

TASK_ALIASES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare",
                "transport": "TwoArmTransport", "tool_hang": "ToolHang", "toolhang": "ToolHang"}


def canonical_task(task: str) -> str:
    """``"lift"`` / ``"Lift"`` -> ``"Lift"``; ``"can"`` -> ``"PickPlaceCan"``; robosuite names pass."""
    return TASK_ALIASES.get(task.lower(), task)
