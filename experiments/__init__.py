"""Thin entry points over the spp_jax library (python -m experiments.<name>)."""
