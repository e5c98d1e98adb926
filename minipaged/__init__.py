"""minipaged: a small, readable paged-KV-cache LLM serving engine (vLLM's ideas in miniature).

Data flows one way: request -> scheduler -> block manager -> worker -> sampler -> output.
"""
__version__ = "0.1.0"
