"""Built-in training entry points for the training adapter."""
