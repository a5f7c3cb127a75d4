"""Lowering: graph ops -> Kernels (one module per kernel family, its cost notes beside it)."""
