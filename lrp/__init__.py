"""Layer-wise Relevance Propagation for image classifiers, in pure PyTorch.

>>> import lrp
>>> explainer = lrp.Explainer(model, composite="epsilon-plus-flat")
>>> explanation = explainer(x)            # x: (N, C, H, W); target None = predicted class
>>> explanation.relevance                 # shaped like x
>>> lrp.conservation(explanation)         # per-sample relative conservation error
"""

from . import composites, rules
from .composites import Composite
from .errors import (
    InvalidInputError,
    LRPError,
    UnresolvedStructureError,
    UnsupportedLayerError,
    UnsupportedOperationError,
)
from .explainer import Explainer, Explanation, conservation
from .tracing import register_container

__all__ = [
    "Composite",
    "Explainer",
    "Explanation",
    "InvalidInputError",
    "LRPError",
    "UnresolvedStructureError",
    "UnsupportedLayerError",
    "UnsupportedOperationError",
    "composites",
    "conservation",
    "register_container",
    "rules",
]
