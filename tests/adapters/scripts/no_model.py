"""Trains nothing and writes no model."""

print("done, but no model written", flush=True)
