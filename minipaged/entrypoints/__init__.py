"""What users run: the ``minipaged`` command line (``generate``, ``serve``, ``bench``), the engine
options it shares with every subcommand, and the OpenAI-compatible server (``openai/``)."""
