"""Triton GPU kernels, one file per op."""
