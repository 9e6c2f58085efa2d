"""Kernels: one module per op, each with a pure-torch reference and optional fast paths behind
the same signature. `dispatch.select_kernels` picks one implementation per op, once."""
