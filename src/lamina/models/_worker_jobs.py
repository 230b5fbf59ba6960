"""One generation request on the replica's engine thread: its context check, its hand-over to the engine
(as an iterator, or submitted to a batching engine), and its answer collected on the event loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from lamina.errors import ContextLengthError, UnavailableError
from lamina.models._engine import Delta, SamplingParams, Sink, TokenLogprob
from lamina.models._worker_stream import BusyShare, Timing, TokenStream


def fit_context(prompt: int, params: SamplingParams, context: int, what: str) -> SamplingParams:
    """Refuse a prompt that cannot fit with its answer; without max_tokens, answer up to the context."""
    take = "take" if what == "messages" else "takes"
    if params.max_tokens is not None:
        if prompt + params.max_tokens > context:
            raise ContextLengthError(
                f"this model's context is {context} tokens; the {what} {take} {prompt} and max_tokens asks "
                f"for {params.max_tokens} more: shorten the {what} or lower max_tokens",
                param=what,
                context_length=context,
                prompt_tokens=prompt,
                max_tokens=params.max_tokens,
            )
        return params
    if prompt >= context:
        raise ContextLengthError(
            f"this model's context is {context} tokens; the {what} {take} {prompt}, leaving no room for an "
            f"answer: shorten the {what}",
            param=what,
            context_length=context,
            prompt_tokens=prompt,
            max_tokens=params.max_tokens,
        )
    return replace(params, max_tokens=context - prompt)


def generation(
    count: Callable[[], int],
    run: Callable[[SamplingParams], Iterator[Delta]],
    params: SamplingParams,
    context: int,
    what: str,
    timing: Timing,
) -> Iterator[int | Delta]:
    """On the engine thread: count the prompt, check the context, yield its token count, then the deltas."""
    timing.begin()
    deltas: Iterator[Delta] | None = None
    try:
        prompt = count()
        params = fit_context(prompt, params, context, what)
        yield prompt
        deltas = run(params)
        for delta in deltas:
            if not timing.first_token:
                timing.first_token = time.perf_counter()
            yield delta
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
        timing.end()


class TimedSink:
    """One request's sink in a batching engine: marks its first token and its end on ``timing``."""

    def __init__(self, stream: TokenStream[int | Delta], timing: Timing) -> None:
        self._stream, self._timing = stream, timing

    @property
    def cancelled(self) -> bool:
        return self._stream.cancelled

    def put(self, delta: Delta) -> None:
        if not self._timing.first_token:
            self._timing.first_token = time.perf_counter()
        if delta.finish_reason is not None:
            self._timing.end()
        self._stream.put(delta)

    def flush(self) -> None:
        self._stream.flush()

    def fail(self, exc: BaseException) -> None:
        self._stream.fail(exc)

    def close(self) -> None:
        if not self._timing.finished:
            self._timing.end()
        self._stream.close()


def admission(
    count: Callable[[], int],
    submit: Callable[[SamplingParams, Sink], None],
    params: SamplingParams,
    context: int,
    what: str,
    timing: Timing,
    share: BusyShare | None = None,
) -> Callable[[TokenStream[int | Delta]], None]:
    """For a batching engine, on the engine thread: count the prompt, check the context, hand over its token
    count, then submit the request with the stream as its sink."""

    def admit(stream: TokenStream[int | Delta]) -> None:
        timing.begin(share)
        prompt = count()
        fitted = fit_context(prompt, params, context, what)
        stream.put(prompt)
        submit(fitted, TimedSink(stream, timing))

    return admit


async def collect(tokens: TokenStream[int | Delta]) -> tuple[str, Delta, tuple[TokenLogprob, ...]]:
    """On the event loop, after ``first()``: the whole answer, its final delta and its log probabilities."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for batch in tokens.batches():
        for item in batch:
            if isinstance(item, int):
                continue
            parts.append(item.text)
            logprobs.extend(item.logprobs)
            if item.finish_reason is not None:
                return "".join(parts), item, tuple(logprobs)
    raise UnavailableError("this replica stopped before the answer was complete; retry the request")
