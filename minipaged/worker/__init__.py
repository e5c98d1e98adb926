"""Execution: the worker (one scheduled step -> model inputs -> logits), the executors that run
it in one process or over tensor-parallel ranks, and the sampler (process groups: ``minipaged.distributed``)."""
