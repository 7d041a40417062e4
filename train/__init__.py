"""The pretraining program (run from the repository root: python -m train.pretrain)."""
