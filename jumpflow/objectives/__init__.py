"""One class per objective; ``OBJECTIVES`` maps the lower-case config names to them."""

from jumpflow.objectives.base import LossOutput, Objective, TimeSampler, jump_sample
from jumpflow.objectives.ddpm import DDPM
from jumpflow.objectives.drifting import Drifting
from jumpflow.objectives.flow_matching import FlowMatching
from jumpflow.objectives.meanflow import MeanFlow
from jumpflow.objectives.transition_matching import TransitionMatching
from jumpflow.objectives.tvm import TerminalVelocityMatching

OBJECTIVES = {
    "flow_matching": FlowMatching,
    "meanflow": MeanFlow,
    "tvm": TerminalVelocityMatching,
    "transition_matching": TransitionMatching,
    "drifting": Drifting,
    "ddpm": DDPM,
}

__all__ = [
    "DDPM",
    "OBJECTIVES",
    "Drifting",
    "FlowMatching",
    "LossOutput",
    "MeanFlow",
    "Objective",
    "TerminalVelocityMatching",
    "TimeSampler",
    "TransitionMatching",
    "jump_sample",
]
