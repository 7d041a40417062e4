"""Subspace finders, one module each, all implementing ``Projector``."""

from optax_lowrank.projectors.base import Basis, Projector, RefreshContext
from optax_lowrank.projectors.blocks import BlockBasis, blocks
from optax_lowrank.projectors.coap import COAPBasis, coap
from optax_lowrank.projectors.coordinates import IndexBasis, coordinates, randperm
from optax_lowrank.projectors.dct import DCTBasis, dct
from optax_lowrank.projectors.golore import golore
from optax_lowrank.projectors.granular import GranularBasis, granular
from optax_lowrank.projectors.grass import SparseBasis, grass
from optax_lowrank.projectors.online_pca import OnlinePCABasis, online_pca
from optax_lowrank.projectors.random import KeyBasis, random
from optax_lowrank.projectors.randomized_svd import randomized_svd
from optax_lowrank.projectors.matmul import PROJ_TYPES, SIDES
from optax_lowrank.projectors.svd import (
    LeftBasis,
    RightBasis,
    TwoSidedBasis,
    svd,
)

__all__ = [
    "Basis",
    "BlockBasis",
    "COAPBasis",
    "DCTBasis",
    "GranularBasis",
    "IndexBasis",
    "KeyBasis",
    "LeftBasis",
    "OnlinePCABasis",
    "PROJ_TYPES",
    "Projector",
    "RefreshContext",
    "RightBasis",
    "SIDES",
    "SparseBasis",
    "TwoSidedBasis",
    "blocks",
    "coap",
    "coordinates",
    "dct",
    "golore",
    "granular",
    "grass",
    "online_pca",
    "random",
    "randomized_svd",
    "randperm",
    "svd",
]
