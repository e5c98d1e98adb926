"""Benchmarks behind ``minipaged bench {throughput,latency,serve,tp,blocks,step,kv-quant}``.
Measured tables, the commands that produced them and the machines are in ``README.md`` here."""
