"""TEMPORARY stand-in for ``minipaged.async_llm.AsyncLLM`` until the lead lands it on main.

Drives today's ``LLM`` (add_request / step / abort) from one background task, with the
interface of notes/ASYNC_API.md. No logprobs, no stop-string hold-back. Delete once
``minipaged.async_llm`` exists (the server imports that first).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

from minipaged.llm import LLM
from minipaged.outputs import RequestOutput
from minipaged.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int


class AsyncLLM:
    def __init__(self, model: Any = None, *, tokenizer: Any = None, **kwargs: Any) -> None:
        self._llm = LLM(model, tokenizer=tokenizer, **kwargs)
        self.tokenizer = self._llm.tokenizer
        self.config = self._llm.config
        self.model_name = self._llm.config.model or "SmolLM2-135M-Instruct"
        self._queues: dict[str, asyncio.Queue] = {}
        self._inbox: list[tuple] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._prompt_tokens = 0
        self._gen_tokens = 0

    def validate(self, prompt: Any, params: SamplingParams) -> None:
        self._llm._validate(prompt, params)

    def chat_prompt(self, messages: list[dict]) -> dict:
        return self._llm.chat_prompts(messages)[0]

    def stats(self) -> EngineStats:
        bs = self._llm.block_manager.stats()
        sch = self._llm.scheduler
        return EngineStats(len(sch.running), len(sch.waiting), self._llm.block_manager.num_blocks, bs.used_blocks,
                           bs.cached_blocks, bs.free_blocks, sch.num_preemptions, self._prompt_tokens,
                           self._gen_tokens)

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run())

    def _drain_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        for op, *args in inbox:
            if op == "add":
                prompt, params, rid = args
                try:
                    self._llm.add_request(prompt, params, request_id=rid)
                except Exception as exc:  # noqa: BLE001
                    self._queues[rid].put_nowait(exc)
            elif args[0] in self._llm._groups:
                self._llm.abort(args[0])

    def _step(self) -> list[RequestOutput]:
        finished = {o.request_id: o for o in self._llm.step()}
        rec = self._llm.trace[-1] if len(self._llm.trace) else None
        if rec is not None:
            self._prompt_tokens += rec.num_prefill_tokens
        touched = {seq.request_id for seq, _ in self._llm._new_tokens}
        self._gen_tokens += len(self._llm._new_tokens)
        outs = list(finished.values())
        for rid in touched - set(finished):
            group = self._llm._groups.get(rid)
            if group is not None:
                outs.append(self._llm._output(group))
        return outs

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._drain_inbox()
            if not self._llm.has_unfinished_requests():
                self._wake.clear()
                continue
            try:
                outs = await asyncio.to_thread(self._step)
            except Exception as exc:  # noqa: BLE001
                for q in self._queues.values():
                    q.put_nowait(exc)
                raise
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    async def generate(self, prompt: Any, params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self.validate(prompt, params)
        self._ensure_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._inbox.append(("add", prompt, params, request_id))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._inbox.append(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        if self._wake is not None:
            self._wake.set()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
