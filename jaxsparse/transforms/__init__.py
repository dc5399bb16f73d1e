"""optax transformations: the shared sparse-training wrapper and the algorithms built on it."""
