"""optax-lowrank: low-rank gradient projection optimizers for Optax."""

from optax_lowrank import accumulation
from optax_lowrank import aliases
from optax_lowrank import blockwise
from optax_lowrank import combine
from optax_lowrank import inner
from optax_lowrank import memory
from optax_lowrank import moments
from optax_lowrank import newton_schulz
from optax_lowrank import projectors
from optax_lowrank import quantize
from optax_lowrank import sampling
from optax_lowrank import schedules
from optax_lowrank import spread
from optax_lowrank import weight_norm
from optax_lowrank import unbiased
from optax_lowrank.accumulation import MultiSteps
from optax_lowrank.aliases import (
    adarankgrad,
    apollo,
    apollo_mini,
    coap,
    dct_adamw,
    fira,
    flora,
    frugal,
    galore,
    galore_8bit,
    golore,
    gradnorm_lorp,
    grass,
    gum,
    osd,
    owlore,
    q_galore,
    vlorp,
)
from optax_lowrank.core import LeafBasis, LowRankState, lowrank_project
from optax_lowrank.moments import RefreshPolicy
from optax_lowrank.projectors import Projector, RefreshContext
from optax_lowrank.registry import STATIC_ARGS, optimizers
from optax_lowrank.shapes import DimensionNumbers, match_paths

__version__ = "0.1.0"

__all__ = [
    "DimensionNumbers",
    "LeafBasis",
    "LowRankState",
    "MultiSteps",
    "Projector",
    "RefreshContext",
    "RefreshPolicy",
    "STATIC_ARGS",
    "accumulation",
    "aliases",
    "adarankgrad",
    "apollo",
    "apollo_mini",
    "blockwise",
    "coap",
    "combine",
    "dct_adamw",
    "fira",
    "flora",
    "frugal",
    "galore",
    "galore_8bit",
    "golore",
    "gradnorm_lorp",
    "grass",
    "gum",
    "inner",
    "lowrank_project",
    "match_paths",
    "memory",
    "moments",
    "newton_schulz",
    "optimizers",
    "osd",
    "owlore",
    "projectors",
    "q_galore",
    "quantize",
    "sampling",
    "schedules",
    "spread",
    "unbiased",
    "vlorp",
    "weight_norm",
]
