"""Draft-model proposer: a small model with its own paged KV cache drafts k tokens per sequence.

The draft model runs through an ordinary ``Worker`` whose cache has one block for each of the
target's block ids (shaped for the draft's own layers and KV heads): token position ``p`` of a
sequence keeps its draft KV in the same block id as its target KV, so the scheduler and the block
manager know nothing about the draft.

Proposing for a decoding sequence of ``N`` tokens (the target has computed ``L = N - 1`` of them) is
``k`` forwards of the draft. The first catches up on every token the draft has not computed yet
(the prompt the first time, the accepted drafts and the bonus token after a verification) and
ends with the newest token; each of the next ``k - 1`` feeds one draft. Each draft is the argmax
(greedy requests) or a draw from the draft's distribution after the request's own logit
processing, temperature and top-k/p (the rejection sampler gets that distribution as ``q``).

Only the sequence's full blocks below ``L`` are written in place. From the block holding position
``L`` on, nothing can be written safely: that partial block may be shared with a forked sibling,
and the positions after it have no block yet (the scheduler gives the drafts slots only in the next
step). Those logical blocks map to scratch blocks past the target's ids, private to the sequence
for one proposal, so the partial block's tokens are recomputed there each time. The draft's
computed length is therefore always a whole number of blocks no greater than the target's, which
verification, rollback and copy-on-write never touch; a preemption resets it to 0.

The draft runs whole in the engine process, rank 0 under tensor parallelism (vLLM splits it over
the target's ranks instead): a small draft's forwards then need no collective per draft token,
and the other ranks never learn that speculation exists, since verification is an ordinary step.
Its weights and cache sit on rank 0 only, counted once in the KV budget. Pipeline parallelism
with speculation is refused by the engine. The cache is stored in the engine's
``kv_cache_dtype`` like the target's, so a quantized cache saves memory on the draft's share too;
greedy output never depends on the draft's numbers, only how many drafts are accepted does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import torch

from minipaged.attention import kv_cache_bytes_per_block
from minipaged.config import EngineConfig
from minipaged.core.block_manager import BlockManager
from minipaged.core.sequence import Sequence
from minipaged.errors import InvalidEngineConfigError
from minipaged.worker.sampler import exponential_noise, filtered_probs, greedy_tokens, process_logits
from minipaged.worker.worker import StepBatch, Worker

FIELD = "speculative_config.model"


def scratch_blocks_per_seq(block_size: int, num_speculative_tokens: int) -> int:
    """Blocks covering positions ``[L - L % block_size, L + k)`` for any ``L``: the partial block and the drafts."""
    return -(-(block_size - 1 + num_speculative_tokens) // block_size)


def draft_cache_bytes(draft_config: Any, config: EngineConfig) -> tuple[int, int]:
    """``(bytes per block, bytes of the scratch blocks)`` of the draft's KV cache, stored as the
    target's (``kv_cache_dtype``, scales included) and whole: the draft is not split across ranks."""
    spec = config.speculative_config
    per_block = kv_cache_bytes_per_block(draft_config, config.block_size, config.torch_dtype, config.kv_cache_dtype)
    scratch = config.max_num_seqs * scratch_blocks_per_seq(config.block_size, spec.num_speculative_tokens)
    return per_block, scratch * per_block


def load_draft_model(config: EngineConfig, target_config: Any, target_tokenizer: Any = None):
    """Load ``speculative_config.model`` like the target (dtype, device, attention backend) and check
    that it speaks the target's vocabulary. Returns a ``LoadedModel``."""
    from minipaged.models import ModelNotFoundError, load_model

    path = config.speculative_config.model
    try:
        loaded = load_model(path, **config.model_kwargs())
    except (ModelNotFoundError, OSError, ValueError) as err:
        raise InvalidEngineConfigError(FIELD, f"cannot load the draft model {path!r}: {err}") from err
    draft_vocab, target_vocab = loaded.config.vocab_size, target_config.vocab_size
    if draft_vocab != target_vocab:
        raise InvalidEngineConfigError(
            FIELD, f"the draft model's vocab_size {draft_vocab} differs from the target's {target_vocab}"
        )
    if (
        target_tokenizer is not None
        and loaded.tokenizer is not None
        and target_tokenizer.get_vocab() != loaded.tokenizer.get_vocab()
    ):
        raise InvalidEngineConfigError(FIELD, "the draft model's tokenizer maps tokens to other ids than the target's")
    return loaded


@dataclass
class _DraftState:
    """What the draft holds for one sequence."""

    num_computed: int = 0  # leading tokens whose draft KV is in the sequence's own (full) blocks
    num_preemptions: int = 0  # the request's count when num_computed was last valid
    probs: torch.Tensor | None = None  # [k, vocab] each draft's distribution; None: greedy (point masses)


class DraftModelProposer:
    """The draft model, its paged KV cache and what it has computed for each sequence."""

    def __init__(
        self, model: torch.nn.Module, config: EngineConfig, eos_token_ids: Set[int], device: torch.device
    ) -> None:
        spec = config.speculative_config
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks  # the target's block ids; scratch blocks follow them
        self.max_batch = config.max_num_seqs
        self.max_batched_tokens = config.max_num_batched_tokens
        self.scratch_per_seq = scratch_blocks_per_seq(config.block_size, spec.num_speculative_tokens)
        self.eos_token_ids = eos_token_ids
        # Whole, in the engine process (see the module docstring); its cache in the engine's kv_cache_dtype.
        own = dataclasses.replace(config, tensor_parallel_size=1, pipeline_parallel_size=1)
        self.worker = Worker(model, own, self.num_blocks + self.max_batch * self.scratch_per_seq, device)
        self._states: dict[Sequence, _DraftState] = {}  # Sequence hashes by identity

    @property
    def num_sequences(self) -> int:
        """Sequences the draft holds state for (finished ones are dropped first)."""
        self._prune()
        return len(self._states)

    def _prune(self) -> None:
        for seq in [s for s in self._states if s.status.finished]:
            del self._states[seq]

    def _state(self, seq: Sequence) -> _DraftState:
        state = self._states.get(seq)
        preemptions = seq.metrics.num_preemptions
        if state is None or state.num_preemptions != preemptions:
            # New, or its request was preempted since (its blocks were freed): start over.
            state = self._states[seq] = _DraftState(num_preemptions=preemptions)
        return state

    def propose(self, seqs: list[Sequence], ks: list[int], bm: BlockManager) -> list[list[int]]:
        """``ks[i]`` draft tokens for each decoding sequence (``num_computed_tokens == num_tokens - 1``)."""
        self._prune()
        out: list[list[int]] = []
        for lo in range(0, len(seqs), self.max_batch):
            chunk, chunk_ks = seqs[lo : lo + self.max_batch], ks[lo : lo + self.max_batch]
            states = [self._state(seq) for seq in chunk]
            tables = [bm.block_table(seq.seq_id) for seq in chunk]
            self._catch_up(chunk, states, tables)
            out += self._draft(chunk, chunk_ks, states, tables)
        return out

    def _catch_up(self, seqs: list[Sequence], states: list[_DraftState], tables: list[list[int]]) -> None:
        """Forwards without sampling over the tokens below each sequence's last full block, until the
        drafting forward fits ``max_num_batched_tokens`` (a long prompt is caught up on in chunks)."""
        bs = self.block_size
        while True:
            gaps = [(seq.num_computed_tokens // bs) * bs - st.num_computed for seq, st in zip(seqs, states)]
            rows = sum(seq.num_computed_tokens + 1 - st.num_computed for seq, st in zip(seqs, states))
            if rows <= self.max_batched_tokens or not any(gaps):
                return
            room, plan = self.max_batched_tokens, []
            for i in sorted(range(len(seqs)), key=lambda i: -gaps[i]):
                if gaps[i] and room:
                    plan.append((i, min(gaps[i], room)))
                    room -= plan[-1][1]
            ids, qlens, clens, btables = [], [], [], []
            for i, count in plan:
                start = states[i].num_computed
                ids += seqs[i].all_token_ids[start : start + count]
                qlens.append(count)
                clens.append(start + count)
                btables.append(tuple(tables[i][: -(-(start + count) // bs)]))
            self.worker.run(StepBatch(tuple(ids), tuple(qlens), tuple(clens), tuple(btables), (), ()))
            for i, count in plan:
                states[i].num_computed += count

    def _draft(
        self, seqs: list[Sequence], ks: list[int], states: list[_DraftState], tables: list[list[int]]
    ) -> list[list[int]]:
        """The k forwards: catch-up plus the newest token, then one draft at a time."""
        bs = self.block_size
        bases = [seq.num_computed_tokens for seq in seqs]  # L: the newest token's position
        btables = []
        for i, (table, base) in enumerate(zip(tables, bases)):
            first = self.num_blocks + i * self.scratch_per_seq
            btables.append(tuple(table[: base // bs]) + tuple(range(first, first + self.scratch_per_seq)))
        ids, qlens, rows = [], [], []
        for seq, st, base in zip(seqs, states, bases):
            ids += seq.all_token_ids[st.num_computed : base + 1]
            qlens.append(base + 1 - st.num_computed)
            rows.append(len(ids) - 1)
        clens = [base + 1 for base in bases]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for step in range(max(ks, default=0)):
            batch = StepBatch(
                tuple(ids), tuple(qlens), tuple(clens), tuple(btables[i] for i in active), (), tuple(rows)
            )
            logits = self.worker.run(batch)
            tokens, dists = self._pick(logits, [seqs[i] for i in active], [drafts[i] for i in active])
            for i, token, dist in zip(active, tokens, dists):
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
            active = [i for i in active if ks[i] > step + 1]
            ids = [drafts[i][-1] for i in active]
            qlens = [1] * len(active)
            clens = [bases[i] + step + 2 for i in active]
            rows = list(range(len(active)))
        for st, base, p in zip(states, bases, probs):
            st.num_computed = (base // bs) * bs
            st.probs = torch.stack(p) if p else None
        return drafts

    def _pick(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each row's draft token and, for a sampled request, the distribution ``[vocab]`` it was drawn from.

        logits: ``[num_seqs, vocab]`` float32, processed as the target's are at verification
        (``minipaged.spec_decode.verifier.target_probs``) so the draft proposes what the target would keep.
        """
        params = [s.params for s in seqs]
        outputs = [s.output_token_ids + d for s, d in zip(seqs, drafts)]
        processed = process_logits(logits, params, [s.prompt_token_ids for s in seqs], outputs, self.eos_token_ids)
        tokens = greedy_tokens(processed).tolist()
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            index = torch.tensor(random_rows, dtype=torch.long, device=processed.device)
            q = filtered_probs(processed[index], [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                tokens[i], dists[i] = draw(q[j], seqs[i].generator), q[j]
        return tokens, dists

    def draft_probs(self, seqs: list[Sequence], drafts: list[tuple[int, ...]]) -> torch.Tensor | None:
        """``[sum(len(d)), vocab]``: the distribution each verified draft was drawn from (one-hot for
        greedy requests), or None when all of them are point masses. Consumes the stored distributions."""
        rows, sampled = [], False
        for seq, d in zip(seqs, drafts):
            state = self._states.get(seq)
            probs = state.probs if state is not None else None
            if state is not None:
                state.probs = None
            rows.append((probs, d))
            sampled |= probs is not None
        if not sampled:
            return None
        vocab = next(p.shape[1] for p, _ in rows if p is not None)
        device = next(p.device for p, _ in rows if p is not None)
        out = []
        for probs, d in rows:
            if probs is not None:
                out.append(probs[: len(d)])
            else:
                one_hot = torch.zeros(len(d), vocab, device=device)
                one_hot[torch.arange(len(d), device=device), torch.tensor(d, dtype=torch.long, device=device)] = 1.0
                out.append(one_hot)
        return torch.cat(out)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``probs`` ``[vocab]`` (an exponential race: ``argmax(probs / e)``, ``e ~ Exp(1)``)."""
    return int(torch.argmax(probs.float() / exponential_noise(probs.shape[0], generator, probs.device)))
