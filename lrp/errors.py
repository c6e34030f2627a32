"""Errors the engine raises, each naming the module, parameter or input at fault."""

from __future__ import annotations


class LRPError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedLayerError(LRPError, TypeError):
    """A module the engine has no rule for (named with its path in the model)."""


class UnresolvedStructureError(LRPError, TypeError):
    """A container whose forward the engine cannot follow (e.g. an unknown residual add)."""


class InvalidInputError(LRPError, ValueError):
    """Input, target or option that cannot be explained as given."""


class UnsupportedOperationError(UnsupportedLayerError, UnresolvedStructureError):
    """A tensor operation in a traced forward with no LRP rule (named with its module path and
    source line); both an unsupported layer and an unresolved structure, so either catch works."""
