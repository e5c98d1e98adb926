"""Scheduling and memory: requests and their sequences, the continuous-batching scheduler, and
the block manager over the physical block pool with its prefix cache. Pure Python, no torch
models: what the scheduler decides, the worker executes."""
