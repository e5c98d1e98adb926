"""Speculative decoding: propose a few tokens cheaply, verify them in one forward pass of the model.

- ``ngram``: the prompt-lookup proposer (copy what followed an earlier occurrence of the sequence's tail);
- ``draft_model``: a small model with its own paged KV cache over the target's block ids drafts
  k tokens per sequence, greedily or sampled (its distribution goes to the rejection sampler);
- ``rejection``: the rejection sampler that turns the target model's logits over the k + 1 verified
  positions into the accepted tokens plus one more (resampled or bonus), keeping the output
  distribution exactly that of ordinary sampling;
- ``controller``: back-off, so a sequence whose drafts keep being rejected stops proposing for a
  while and probes again later (the engine also stops proposing for everybody while
  ``disable_by_batch_size`` sequences run: ``minipaged.config.SpeculativeConfig``);
- ``verifier``: the glue the engine calls, from a step's logits to each sequence's new tokens.

The scheduler gives the drafts KV slots and the worker runs them through the ordinary paged
extend path; the engine rolls the block table back over the rejected ones.
"""
