"""Batched clients."""
