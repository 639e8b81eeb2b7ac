"""Serving: the batching engine and the front ends that share it."""
