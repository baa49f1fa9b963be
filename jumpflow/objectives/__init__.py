"""One class per objective; ``OBJECTIVES`` maps the lower-case config names to them."""

from jumpflow.objectives.alpha_flow import AlphaFlow
from jumpflow.objectives.artm import AutoregressiveTransitionMatching
from jumpflow.objectives.base import LossOutput, Objective, TimeSampler, jump_sample
from jumpflow.objectives.consistency import ConsistencyTraining, EasyConsistencyTraining
from jumpflow.objectives.ddpm import DDPM
from jumpflow.objectives.distill import AlignYourFlow, ConsistencyDistillation
from jumpflow.objectives.drifting import Drifting
from jumpflow.objectives.flow_matching import FlowMatching
from jumpflow.objectives.improved_meanflow import ImprovedMeanFlow
from jumpflow.objectives.meanflow import MeanFlow
from jumpflow.objectives.regression import Regression
from jumpflow.objectives.sct import ContinuousConsistency
from jumpflow.objectives.shortcut import Shortcut
from jumpflow.objectives.transition_matching import TransitionMatching
from jumpflow.objectives.tvm import TerminalVelocityMatching

OBJECTIVES = {
    "flow_matching": FlowMatching,
    "meanflow": MeanFlow,
    "tvm": TerminalVelocityMatching,
    "transition_matching": TransitionMatching,
    "drifting": Drifting,
    "ddpm": DDPM,
    "regression": Regression,
    "shortcut": Shortcut,
    "consistency": ConsistencyTraining,
    "sct": ContinuousConsistency,
    "alpha_flow": AlphaFlow,
    "improved_meanflow": ImprovedMeanFlow,
    "ect": EasyConsistencyTraining,
    "distill_consistency": ConsistencyDistillation,
    "distill_ayf": AlignYourFlow,
    "transition_matching_ar": AutoregressiveTransitionMatching,
}

__all__ = [
    "DDPM",
    "OBJECTIVES",
    "AlignYourFlow",
    "AlphaFlow",
    "AutoregressiveTransitionMatching",
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "ContinuousConsistency",
    "Drifting",
    "EasyConsistencyTraining",
    "FlowMatching",
    "ImprovedMeanFlow",
    "LossOutput",
    "MeanFlow",
    "Objective",
    "Regression",
    "Shortcut",
    "TerminalVelocityMatching",
    "TimeSampler",
    "TransitionMatching",
    "jump_sample",
]
