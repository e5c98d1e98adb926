"""OutputProcessor: the engine core's token ids turned into text, per request (vLLM v1's ``OutputProcessor``).

The core has no tokenizer; this is where text lives. For every live request it keeps the
tokens, logprobs and detokenised text of each completion, finds stop strings (cutting the
text before them and telling the caller which sequences to finish), and decides how much
text is safe to *release* to a streaming consumer:

- a tail that is still the start of some stop string is held back, since the next token
  may complete it and then the tail must vanish (``stop=["ris.\\n\\n"]`` never streams
  ``"ris."``); only as much is held as could still match, not ``max(len(stop)) - 1``;
- a trailing partial UTF-8 character (decoded as U+FFFD) is held until the next token completes it;
- a finished completion releases everything, so the concatenated stream equals the final text.

Released text only ever grows, which is what makes cumulative outputs (``AsyncLLM``) and
deltas (``LLM.stream``) agree with ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from minipaged.engine.core import CoreOutput
from minipaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, StreamChunk
from minipaged.sampling_params import SamplingParams


@dataclass
class _Completion:
    """One completion's text state."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    text: str = ""  # decoded output, cut before a stop string once one is found
    released: int = 0  # characters of ``text`` handed to consumers so far
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def output(self, final_text: bool) -> CompletionOutput:
        lps = self.logprobs
        cumulative = sum(d[t].logprob for d, t in zip(lps, self.token_ids)) if lps is not None else None
        return CompletionOutput(
            index=self.index,
            text=self.text if final_text else self.text[: self.released],
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if lps is None else list(lps),
            cumulative_logprob=cumulative,
        )


@dataclass
class RequestState:
    """Everything the processor knows about one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    completions: dict[int, _Completion] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        done = [c for c in self.completions.values() if c.finish_reason is not None]
        return len(done) == self.params.n

    def output(self) -> RequestOutput:
        """The request so far: released text only, whole text once finished (cumulative, vLLM's default)."""
        completions = [
            self.completions[i].output(final_text=self.completions[i].finish_reason is not None)
            for i in sorted(self.completions)
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=completions,
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
        )


@dataclass
class RequestUpdate:
    """What one step changed for one request: per-completion deltas, and the state to build outputs from."""

    state: RequestState
    chunks: list[StreamChunk]

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass(frozen=True)
class StopHit:
    """A completion that reached a stop string: the caller finishes it in the engine core."""

    request_id: str
    index: int
    stop: str


class OutputProcessor:
    """Detokenises, applies stop strings and routes nothing itself: front ends deliver the updates."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        metrics: RequestMetrics,
    ) -> RequestState:
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, metrics)
        self.states[request_id] = state
        return state

    def process(self, outputs: Sequence[CoreOutput]) -> tuple[list[RequestUpdate], list[StopHit]]:
        """Apply one step's core outputs. Finished requests are forgotten (their updates still carry them)."""
        updates: dict[str, RequestUpdate] = {}
        stops: list[StopHit] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:  # aborted while the step ran
                continue
            comp = state.completions.get(out.index)
            if comp is None:
                comp = state.completions[out.index] = _Completion(out.index)
                if state.params.logprobs is not None:
                    comp.logprobs = []
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = [None, *self._decoded(out.prompt_logprobs[1:])]
            before = comp.released
            comp.token_ids.extend(out.new_token_ids)
            if comp.logprobs is not None and out.new_logprobs is not None:
                comp.logprobs.extend(self._decoded(out.new_logprobs))
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
            hit = self._update_text(state.params, comp)
            new_ids = list(out.new_token_ids)
            if hit is not None:
                stops.append(StopHit(state.request_id, comp.index, hit))
                if len(new_ids) > 1:  # speculative decoding: drop the tokens after the stop string's end
                    new_ids = self._trim_after_stop(state.params, comp, hit, len(new_ids))
            update = updates.setdefault(out.request_id, RequestUpdate(state, []))
            update.chunks.append(
                StreamChunk(
                    state.request_id,
                    comp.index,
                    new_ids,
                    comp.text[before : comp.released],
                    comp.finish_reason,
                )
            )
        for rid, update in updates.items():
            if update.finished:
                del self.states[rid]
        return list(updates.values()), stops

    def abort(self, request_id: str) -> RequestUpdate | None:
        """Forget a request; its unfinished completions end with ``"abort"``. None if it was not live."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        chunks = []
        for index in range(state.params.n):
            comp = state.completions.setdefault(index, _Completion(index))
            if comp.finish_reason is None:
                comp.finish_reason = "abort"
                chunks.append(StreamChunk(request_id, index, [], comp.text[comp.released :], "abort"))
                comp.released = len(comp.text)
        return RequestUpdate(state, chunks)

    # ---- text --------------------------------------------------------------------------
    def _decoded(self, logprobs: list[dict[int, Logprob]]) -> list[dict[int, Logprob]]:
        if self.tokenizer is None:
            return logprobs
        return [{t: Logprob(lp.logprob, lp.rank, self.tokenizer.decode([t])) for t, lp in d.items()} for d in logprobs]

    def _trim_after_stop(self, params: SamplingParams, comp: _Completion, hit: str, num_new: int) -> list[int]:
        """Keep the completion's tokens only up to the first one whose text completes ``hit``, as one
        token per step would have; returns the kept new tokens (of the last ``num_new``)."""
        first_new = len(comp.token_ids) - num_new
        for end in range(first_new + 1, len(comp.token_ids)):
            text = self.tokenizer.decode(comp.token_ids[:end], skip_special_tokens=params.skip_special_tokens)
            if hit in text:
                del comp.token_ids[end:]
                if comp.logprobs is not None:
                    del comp.logprobs[end:]
                break
        return comp.token_ids[first_new:]

    def _update_text(self, params: SamplingParams, comp: _Completion) -> str | None:
        """Re-decode, look for a stop string, move the release point; returns the stop string hit."""
        if self.tokenizer is None:
            return None
        if comp.stop_reason is not None and isinstance(comp.stop_reason, str):
            return None  # already cut at its stop string
        text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=params.skip_special_tokens)
        hit = None
        if params.stop and len(comp.token_ids) >= params.min_tokens:
            # A new match can only end in the new text: start one stop-length before it.
            start = max(0, len(comp.text) - max(len(s) for s in params.stop))
            found = [(i, s) for s in params.stop if (i := text.find(s, start)) >= 0]
            if found:
                cut, hit = min(found)
                text = text[:cut]
                comp.finish_reason, comp.stop_reason = "stop", hit
        comp.text = text
        safe = len(text) if comp.finish_reason is not None else _safe_length(text, params.stop)
        # Released text never shrinks (a decode that is not prefix-stable cannot take it back).
        comp.released = min(len(text), max(comp.released, safe))
        return hit


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be released: not a tail that may still grow into a stop string,
    nor a trailing partial character."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), held, -1):
            if text.endswith(s[:k], 0, end):
                held = k
                break
    return end - held
