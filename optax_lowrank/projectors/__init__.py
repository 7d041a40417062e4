"""Subspace finders, one module each, all implementing ``Projector``."""

from optax_lowrank.projectors.base import Basis, Projector
from optax_lowrank.projectors.blocks import BlockBasis, blocks
from optax_lowrank.projectors.coordinates import IndexBasis, coordinates, randperm
from optax_lowrank.projectors.granular import GranularBasis, granular
from optax_lowrank.projectors.online_pca import OnlinePCABasis, online_pca
from optax_lowrank.projectors.random import KeyBasis, random
from optax_lowrank.projectors.svd import (
    PROJ_TYPES,
    LeftBasis,
    RightBasis,
    TwoSidedBasis,
    svd,
)

__all__ = [
    "Basis",
    "BlockBasis",
    "GranularBasis",
    "IndexBasis",
    "KeyBasis",
    "LeftBasis",
    "OnlinePCABasis",
    "PROJ_TYPES",
    "Projector",
    "RightBasis",
    "TwoSidedBasis",
    "blocks",
    "coordinates",
    "granular",
    "online_pca",
    "random",
    "randperm",
    "svd",
]
