"""The registry of ready optimizers: name → factory ``f(learning_rate, ...)``.

Training programs look optimizers up here (``optax_lowrank.optimizers``), so a
new alias is usable by name without touching them. ``STATIC_ARGS[name]`` lists
the arguments of each that ``optax.inject_hyperparams`` must leave static
(``aliases.static_args``)::

  optax.inject_hyperparams(optax_lowrank.galore,
                           static_args=optax_lowrank.STATIC_ARGS["galore"])
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
    "gradnorm_lorp": aliases.gradnorm_lorp,
    "gum": aliases.gum,
    "owlore": aliases.owlore,
}

STATIC_ARGS = {
    name: aliases.static_args(factory) for name, factory in optimizers.items()
}
