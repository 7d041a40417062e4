"""The pretraining and fine-tuning programs (run from the repository root: python -m
train.pretrain, python -m train.finetune)."""

import os

# jaxlib's CPU LAPACK (the SVD behind GaLore's refresh) runs on scipy's OpenBLAS,
# whose own threads fight XLA's thread pool for the cores: a refresh step of the
# tiny model on 8 simulated CPU devices took 24 s with them and 0.4 s without.
# This must be set before numpy or jax load OpenBLAS; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
