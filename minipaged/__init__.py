"""minipaged: a small, readable paged-KV-cache LLM serving engine (vLLM's ideas in miniature).

Data flows one way: request -> scheduler -> block manager -> worker -> sampler -> output.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "BeamSearchParams"]


def __getattr__(name: str):
    # Lazy: `import minipaged` (e.g. for the block manager alone) must not load torch models.
    if name == "LLM":
        from minipaged.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from minipaged.engine.async_llm import AsyncLLM

        return AsyncLLM
    if name == "SamplingParams":
        from minipaged.sampling_params import SamplingParams

        return SamplingParams
    if name == "BeamSearchParams":
        from minipaged.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    raise AttributeError(f"module 'minipaged' has no attribute {name!r}")
