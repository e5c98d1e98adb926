"""An OpenAI-compatible HTTP server over AsyncLLM (``python -m minipaged serve``).

protocol: request bodies; serving: the two generation endpoints; logprobs: OpenAI's logprob
shapes; metrics: Prometheus; errors: OpenAI error bodies; app: routes; cli: the command.
"""
