"""StructuredOutputManager: compiled grammars, one matcher per sequence, the step's token bitmask.

The engine core calls it at three points of a step (vLLM v1's structured-output manager
split the same way):

- ``prepare(params)`` when a request is added: the grammar is compiled on a worker thread,
  cached by ``(kind, spec)``, so the step loop never compiles. The cache keeps the
  ``max_cached_grammars`` most recently used grammars: a server that meets a new schema in
  every request must not keep them all (a live matcher holds its own grammar either way);
- ``apply_bitmask(logits, seqs)`` before sampling: each constrained row's matcher fills its
  row of ``bitmask [rows, ceil(vocab / 32)]`` int32, and the disallowed logits become -inf
  (Triton on a GPU, vectorised torch on CPU). A grammar still compiling makes this step
  wait for it: the compile started when the request arrived and ran beside its prefill,
  so the wait is at most the compile time left, once per grammar;
- ``accept(seq, token)`` after sampling: the matcher advances; the return value says the
  grammar has terminated, which finishes the sequence with ``"stop"``.

A matcher tracks how many of its sequence's output tokens it has accepted. When that
differs from the sequence (after a preemption, or any path that changed the outputs
under it) the matcher rolls back or replays the outputs, so its state always equals the
tokens the sequence holds.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from minipaged.core.sequence import Sequence
from minipaged.errors import InvalidSamplingParamsError
from minipaged.sampling_params import StructuredOutputsParams
from minipaged_kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_torch

# Compiled grammars kept for reuse; each holds per-token tables over the whole vocabulary.
MAX_CACHED_GRAMMARS = 128

# Compact JSON (no free whitespace between tokens): a weak model can otherwise emit spaces and
# newlines until max_tokens, and a schema-valid answer needs none of them.
ANY_WHITESPACE = False


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The parsed ``xgrammar.Grammar`` of ``params``; a malformed spec is an ``InvalidSamplingParamsError``
    naming ``structured_outputs.<kind>``. Parsing is cheap; compiling it against a vocabulary is not."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            schema = json.loads(params.json)
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
            return xgr.Grammar.from_json_schema(params.json, any_whitespace=ANY_WHITESPACE)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=ANY_WHITESPACE)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(params.grammar)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses of its own
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidSamplingParamsError(f"structured_outputs.{kind}", f"invalid: {message}") from exc


@dataclass
class _SeqMatcher:
    matcher: Any  # xgrammar.GrammarMatcher
    num_accepted: int = 0


class StructuredOutputManager:
    """Grammar compilation (thread pool + cache), per-sequence matchers and the bitmask of a step.

    tokenizer: a Hugging Face tokenizer; vocab_size: the model's logits width (the bitmask's
    vocabulary); stop_token_ids: the ids that end a completed grammar (the model's EOS).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        max_workers: int = 1,
        max_cached_grammars: int = MAX_CACHED_GRAMMARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_cached_grammars = max_cached_grammars
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._compiler: Any = None  # built on the pool's thread: reading a 50k vocabulary takes a while
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()  # least recently used first
        self._matchers: dict[tuple[str, int], _SeqMatcher] = {}

    # ---- compilation ----------------------------------------------------------------------
    def check(self, params: StructuredOutputsParams) -> None:
        """Raise the typed error a malformed grammar spec gives; compiles nothing."""
        if params.key not in self._compiled:
            build_grammar(params)

    def prepare(self, params: StructuredOutputsParams) -> Future:
        """Start compiling ``params``' grammar (once per key); the future holds the compiled grammar."""
        key = params.key
        future = self._compiled.get(key)
        if future is None:
            future = self._pool.submit(self._compile, params)
            self._compiled[key] = future
            while len(self._compiled) > self.max_cached_grammars:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return future

    @property
    def num_cached_grammars(self) -> int:
        """Compiled (or compiling) grammars held for reuse, at most ``max_cached_grammars``."""
        return len(self._compiled)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
            )
            # This manager caches (and bounds) compiled grammars itself; xgrammar's own cache has no bound.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler.compile_grammar(build_grammar(params))

    # ---- matchers -------------------------------------------------------------------------
    def _matcher(self, seq: Sequence) -> _SeqMatcher:
        """The sequence's matcher, in step with its output tokens (created, rolled back or replayed)."""
        import xgrammar as xgr

        state = self._matchers.get(seq.seq_id)
        outputs = seq.output_token_ids
        if state is None or state.num_accepted > len(outputs) and not self._rollback(state, len(outputs)):
            compiled = self.prepare(seq.params.structured_outputs).result()
            state = _SeqMatcher(xgr.GrammarMatcher(compiled))
            self._matchers[seq.seq_id] = state
        for token in outputs[state.num_accepted :]:
            state.matcher.accept_token(token)
            state.num_accepted += 1
        return state

    @staticmethod
    def _rollback(state: _SeqMatcher, length: int) -> bool:
        try:
            state.matcher.rollback(state.num_accepted - length)
        except Exception:  # noqa: BLE001 - past the rollback window: the caller rebuilds
            return False
        state.num_accepted = length
        return True

    @torch.inference_mode()  # the worker's logits are inference tensors, masked in place
    def apply_bitmask(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """Mask the constrained rows of ``logits [len(seqs), vocab]`` in place; returns ``logits``."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not rows:
            return logits
        bitmask = self.fill_bitmask([seqs[i] for i in rows])
        if len(rows) == len(seqs):
            return self.apply(logits, bitmask)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = self.apply(logits[index], bitmask)
        return logits

    def fill_bitmask(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """``[len(seqs), ceil(vocab / 32)]`` int32 on CPU: each sequence's allowed next tokens."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(seqs), words), -1, dtype=torch.int32)
        for row, seq in enumerate(seqs):
            self._matcher(seq).matcher.fill_next_token_bitmask(bitmask, row)
        return bitmask

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """In place: the Triton kernel on a GPU, vectorised torch ops on CPU."""
        if logits.device.type == "cpu":
            return apply_token_bitmask_torch(logits, bitmask)
        return apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True))

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance ``seq``'s matcher by its newest output ``token``; True when the grammar has terminated."""
        state = self._matcher(seq)  # accepts every output the matcher has not seen, ``token`` included
        return bool(state.matcher.is_terminated())

    def release(self, seq_ids: Iterable[tuple[str, int]]) -> None:
        """Forget the matchers of finished sequences."""
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)

    @property
    def num_matchers(self) -> int:
        """Live per-sequence matchers (0 once every constrained request finished)."""
        return len(self._matchers)

    def shutdown(self) -> None:
        """Stop the compile thread (pending compiles are cancelled). Idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)
