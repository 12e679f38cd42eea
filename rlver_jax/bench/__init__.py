"""Benchmarks (`rlver-jax bench ...`)."""
