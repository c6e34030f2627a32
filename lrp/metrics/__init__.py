"""Metrics that judge explanations (METHOD.md sections 2-4).

- :func:`insertion_deletion`: insertion, deletion and ID (RISE; Otsuki et al. 2024)
- :func:`perturbation_curve`: MoRF / LeRF region perturbation and AOPC (Samek et al. 2017)
- :func:`conservation_error`: |sum R - R0| / |R0|
- :func:`relevance_mass`, :func:`pointing_game`, :func:`boxes_to_masks`: localisation
- :mod:`lrp.metrics.table`: Otsuki et al. Table 1 layout for many methods (CLI)
"""

from lrp.metrics.conservation import conservation_error
from lrp.metrics.insertion_deletion import InsertionDeletionResult, insertion_deletion
from lrp.metrics.localisation import boxes_to_masks, pointing_game, relevance_mass
from lrp.metrics.perturbation import PerturbationResult, perturbation_curve

__all__ = [
    "InsertionDeletionResult",
    "PerturbationResult",
    "boxes_to_masks",
    "conservation_error",
    "insertion_deletion",
    "perturbation_curve",
    "pointing_game",
    "relevance_mass",
]
