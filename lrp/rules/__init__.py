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
from .lrn import LRNIdentity, LRNTaylor, lrn_contributions, lrn_relevance
from .normalization import AffineEpsilon, GroupNormRule, InstanceNormRule, LayerNormRule
from .pooling import Proportional
from .residual import ResidualMerge

__all__ = [
    "LRP0",
    "AffineEpsilon",
    "AlphaBeta",
    "Epsilon",
    "Flat",
    "Gamma",
    "GroupNormRule",
    "InstanceNormRule",
    "LRNIdentity",
    "LRNTaylor",
    "LayerNormRule",
    "LinearRule",
    "ModuleRule",
    "Pass",
    "Proportional",
    "ResidualMerge",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "ZPlusOnes",
    "lrn_contributions",
    "lrn_relevance",
    "stabilize",
]
