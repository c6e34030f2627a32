"""LRP rules: hyper-parameter holders applied by the explainer's rule layers."""

from .base import ModuleRule, Pass, Rule, stabilize
from .linear import (
    LRP0,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    LinearRule,
    WSquare,
    ZBox,
    ZPlus,
    ZPlusOnes,
)
from .pooling import Proportional
from .residual import ResidualMerge

__all__ = [
    "LRP0", "AlphaBeta", "Epsilon", "Flat", "Gamma", "LinearRule", "ModuleRule", "Pass",
    "Proportional", "ResidualMerge", "Rule", "WSquare", "ZBox", "ZPlus", "ZPlusOnes", "stabilize",
]
