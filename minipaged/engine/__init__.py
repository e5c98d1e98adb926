"""The engine: ``EngineCore`` (one step at a time, token ids in and out) and the front ends that
drive it through its public interface: ``LLM`` (offline), ``AsyncLLM`` (servers), beam search,
and the output processor that turns token ids into text."""
