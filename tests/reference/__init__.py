"""Independent float64 NumPy reference implementations of the published optimizers."""
