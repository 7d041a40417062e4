"""Inner optimizers written here: the Adam variants of the reference codes."""

from optax_lowrank.inner.adam import (
    scale_by_adam_leafwise,
    scale_by_adam_uncorrected,
    scale_by_bias_correction,
)
from optax_lowrank.inner.factored import scale_by_factored_rms
from optax_lowrank.inner.momentum import ema_nesterov

__all__ = [
    "ema_nesterov",
    "scale_by_adam_leafwise",
    "scale_by_adam_uncorrected",
    "scale_by_bias_correction",
    "scale_by_factored_rms",
]
