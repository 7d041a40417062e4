"""Subspace finders, one module each, all implementing ``Projector``."""

from optax_lowrank.projectors.base import Basis, Projector
from optax_lowrank.projectors.svd import (
    PROJ_TYPES,
    LeftBasis,
    RightBasis,
    TwoSidedBasis,
    svd,
)

__all__ = [
    "Basis",
    "LeftBasis",
    "PROJ_TYPES",
    "Projector",
    "RightBasis",
    "TwoSidedBasis",
    "svd",
]
