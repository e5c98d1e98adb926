"""Data files shipped with minipaged (the default serving-benchmark prompts)."""
