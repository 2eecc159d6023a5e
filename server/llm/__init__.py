"""LLM generation: engines (continuous batching on transformers, vLLM when present) and their endpoints."""
