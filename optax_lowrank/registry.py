"""The registry of ready optimizers: name → factory ``f(learning_rate, ...)``.

Training programs look optimizers up here (``optax_lowrank.optimizers``), so a
new alias is usable by name without touching them.
"""

from optax_lowrank import aliases

optimizers = {
    "galore": aliases.galore,
    "apollo": aliases.apollo,
    "apollo_mini": aliases.apollo_mini,
    "fira": aliases.fira,
    "frugal": aliases.frugal,
    "flora": aliases.flora,
    "vlorp": aliases.vlorp,
    "osd": aliases.osd,
    "dct_adamw": aliases.dct_adamw,
    "grass": aliases.grass,
    "adarankgrad": aliases.adarankgrad,
    "galore_8bit": aliases.galore_8bit,
    "q_galore": aliases.q_galore,
    "coap": aliases.coap,
    "golore": aliases.golore,
}
