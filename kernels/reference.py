"""Naive contiguous-cache references for the kernels in this package.

Each function has the same signature as its kernel. Attention references gather a
sequence's blocks into a contiguous K/V and run a plain softmax; pass float64 inputs
for tight checks.
"""
