"""Continuous batching over one llama.cpp context: slots, admission, prefix reuse, and the decode step.

The context holds ``parallel`` sequences, each in its own KV stream of ``n_ctx`` tokens (llama.cpp's
non-unified cache), so a request's context never depends on its neighbours, and identical greedy requests
give identical answers alone, in a batch, or after a cached prefix (logits equal to the bit). That holds
without flash attention and on one condition the step keeps: a prompt token is never evaluated as its
stream's only token in a ubatch. llama.cpp's CPU build computes attention for one query token with ggml's
dot products and for several with llamafile's tinyBLAS, which round differently; and llama.cpp splits a
batch into ubatches of equal tokens per stream, so a prompt chunk sent with decoding streams had its first
token evaluated beside their single tokens (answers changed, found with long prompts joining running
streams). So each step sends the decoding streams' tokens in one ``llama_decode`` and the prompt chunks in
one per chunk length, chunks are at least two tokens, and a cached prefix leaves the last two to evaluate.

Each step decodes every running sequence's pending token and chunks of prompts being prefilled (up to
``n_batch`` tokens in all), so a long prompt never stalls the streams already running. Requests wait in
FIFO order for a free slot; one whose client has gone is dropped before it costs a prefill, and a running
one leaves the batch at the next step.

The split cache computes one run of consecutive sequence ids per graph: a batch of slots {0, 1, 3}, or one
listing slot 1 before slot 0, is two graphs, each costing about a whole step. So the batch lists its tokens
in slot order, and a new request takes a free slot that keeps the running slots consecutive (filling gaps
first). Measured in process, 8 sequences of 96 tokens: 145 tokens/s with the batch in arrival order, 188 to
198 in slot order.

Prefix caching: a finished sequence leaves its tokens in its slot. Among the slots that keep the running
ones consecutive, a new request takes the one whose cached tokens share the longest prefix with its prompt
and evaluates only the rest; when another slot, free or busy, holds a much longer shared prefix (a common
system prompt, a RAG template, an earlier turn of the conversation), its stream is copied in first. Requests
sent together with such a prefix evaluate it once: the others wait a step for the first and copy it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from lamina.errors import EngineError, LaminaError
from lamina.models._engine import Delta, SamplingParams, Sink, TokenLogprob, Usage
from lamina.models._gguf_sampling import Sampler, TextOutput, Vocab

#: a busy slot's prefix is copied (a whole KV stream) only when it saves at least this many tokens
COPY_PREFIX_MIN = 64


@dataclass
class Sequence:
    """One request inside the decoder."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    sampler: Sampler
    text: TextOutput
    order: int
    #: prompt and generated tokens; the KV cache holds the first ``n_past``
    tokens: list[int] = field(default_factory=list)
    n_past: int = 0
    generated: int = 0
    #: where this sequence's logits are in the batch just decoded, -1 when it has none
    out_index: int = -1
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: a request admitted with another that is prefilling the same long prefix waits for it: (the other's
    #: slot, the other, the tokens they share); its prefill starts from a copy of them
    awaits: tuple[Slot, Sequence, int] | None = None

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@dataclass
class Slot:
    seq_id: int
    #: tokens whose KV is in this slot's stream, as position 0..n-1
    cached: list[int] = field(default_factory=list)
    running: Sequence | None = None
    last_used: int = 0


def layout(ids: set[int]) -> tuple[int, int]:
    """How many runs of consecutive numbers ``ids`` makes ({0, 1, 3} is two), and the span they cover
    (4): fewer runs first, then the smaller span, which fills gaps before it extends the ends."""
    return sum(1 for i in ids if i - 1 not in ids), max(ids) - min(ids) + 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def chunk(remaining: int, room: int) -> int:
    """How many of a prompt's ``remaining`` tokens to evaluate in a step with ``room`` tokens left: all
    that fit, else at least two and never leaving exactly one for later (a lone prompt token in its
    stream's ubatch takes other arithmetic than a run of them); 0: none this step."""
    if remaining <= room:
        return remaining
    take = room if remaining - room >= 2 else room - 1
    return take if take >= 2 else 0


class BatchDecoder:
    """Sequences of one llama.cpp context, advanced together one step at a time (engine thread only)."""

    def __init__(self, ctx: Any, vocab: Vocab, parallel: int, n_batch: int, n_ctx_seq: int) -> None:
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._slots = [Slot(i) for i in range(parallel)]
        self._waiting: deque[Sequence] = deque()
        self._clock = itertools.count(1)
        #: prompt tokens served from the prefix cache, and evaluated, since the start (for metrics)
        self.reused_tokens = 0
        self.evaluated_tokens = 0
        #: KV streams copied from one slot to another to reuse a prefix
        self.copied_streams = 0

    def warm_up(self, token: int) -> None:
        """One decode of one token, then an empty cache: llama.cpp's first decode sets things up (as
        llama-server's start-up warm-up does), which a first request would otherwise pay for."""
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = token, 0, 1, True
        b.seq_id[0][0] = 0
        b.n_tokens = 1
        llama_cpp.llama_decode(self._ctx, b)
        llama_cpp.llama_memory_clear(self._memory, True)

    # -- admission -------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, seed: int) -> None:
        sampler = Sampler(self._vocab, params, seed, history=self.n_ctx_seq)
        seq = Sequence(prompt, params, sink, sampler, TextOutput(params.stop), next(self._clock))
        seq.tokens = list(prompt)
        self._waiting.append(seq)

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.running is not None for s in self._slots)

    def _admit(self) -> None:
        free = [s for s in self._slots if s.running is None]
        while self._waiting and free:
            seq = self._waiting.popleft()
            if seq.sink.cancelled:
                self._end(seq, None)
                continue
            slot = self._place(seq, free)
            free.remove(slot)

    def _place(self, seq: Sequence, free: list[Slot]) -> Slot:
        """Put ``seq`` in a free slot next to the running ones (a gap in the running sequence ids costs a
        graph per step, see ``_fill``), the one that saves the most prompt evaluation among those; when
        another slot, free or busy, holds a much longer shared prefix, its stream is copied in first; when a
        request still prefilling will hold one (requests sent together with the same system prompt or RAG
        template), ``seq`` waits for it and copies it then (``_copy_awaited``)."""
        # the last two prompt tokens are always evaluated: the last's logits start the answer, and a single
        # token evaluated alone would take other arithmetic than it does in the whole prompt
        limit = max(len(seq.prompt) - 2, 0)
        shared = {s.seq_id: min(common_prefix(s.cached, seq.prompt), limit) for s in self._slots}
        busy = {s.seq_id for s in self._slots if s.running is not None}
        slot = min(free, key=lambda s: (*layout(busy | {s.seq_id}), -shared[s.seq_id], s.last_used))
        keep = shared[slot.seq_id]
        donor = max(self._slots, key=lambda s: shared[s.seq_id])
        if shared[donor.seq_id] >= keep + COPY_PREFIX_MIN:
            keep = shared[donor.seq_id]
            self._copy(donor, slot, keep)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        del slot.cached[keep:]
        seq.n_past = keep
        self.reused_tokens += keep
        seq.awaits = self._prefilling_with(seq, keep + COPY_PREFIX_MIN, limit)
        slot.running, slot.last_used = seq, next(self._clock)
        return slot

    def _prefilling_with(self, seq: Sequence, least: int, limit: int) -> tuple[Slot, Sequence, int] | None:
        """The running request still prefilling that shares the longest prefix with ``seq`` (at least
        ``least`` tokens, at most ``limit``): its slot, itself and that length; None if there is none."""
        best: tuple[Slot, Sequence, int] | None = None
        for other in self._slots:
            running = other.running
            if running is None or running.awaits is not None or not running.prefilling:
                continue
            n = min(common_prefix(running.prompt, seq.prompt), limit)
            if n >= least and (best is None or n > best[2]):
                best = (other, running, n)
        return best

    def _copy(self, donor: Slot, slot: Slot, keep: int) -> None:
        """``slot``'s stream becomes a copy of ``donor``'s first ``keep`` tokens."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        slot.cached = donor.cached[:keep]
        self.copied_streams += 1

    def _copy_awaited(self, running: list[tuple[Slot, Sequence]]) -> None:
        """Requests waiting for another's prefill of their prefix: copy it once it is in the cache; if that
        request left before it got there (or its slot was given to another), prefill it themselves."""
        for slot, seq in running:
            if seq.awaits is None:
                continue
            donor, other, n = seq.awaits
            if donor.running is other and other.n_past < n:
                continue  # not in the cache yet
            seq.awaits = None
            # in the cache (evaluated by the last step, or left there by the request that ended), unless
            # its slot has been given to another request meanwhile: then this one evaluates it itself
            if donor.cached[:n] == seq.prompt[:n]:
                self._copy(donor, slot, n)
                self.reused_tokens += n - seq.n_past
                seq.n_past = n

    # -- the step ----------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, drop the abandoned, decode one batch, sample; True while any request remains.

        Should anything in the step fail unexpectedly, every request in the engine fails with it (each
        client gets an error and may retry) and the slots start empty, so nothing is left hanging.
        """
        try:
            return self._step()
        except Exception as exc:
            failure = EngineError(f"the engine failed ({type(exc).__name__}: {exc}); retry the request")
            for slot, seq in self._running():
                self._forget(slot)
                self._release(slot, seq, failure)
            while self._waiting:
                self._end(self._waiting.popleft(), failure)
            return False

    def _step(self) -> bool:
        self._admit()
        running = self._running()
        for slot, seq in running:
            if seq.sink.cancelled:
                self._release(slot, seq, None)
        running = self._running()
        if not running:
            return self.busy
        self._copy_awaited(running)
        groups = self._plan(running)
        for i, group in enumerate(groups):
            if i:  # what the decodes before this one produced goes out before it runs
                for _, seq, _ in groups[i - 1]:
                    seq.sink.flush()
            self._fill(group)
            rc = llama_cpp.llama_decode(self._ctx, self._batch)
            if rc != 0:
                failure = EngineError(f"llama.cpp failed to decode a batch (status {rc}); retry the request")
                for slot, seq in self._running():
                    self._forget(slot)
                    self._release(slot, seq, failure)
                return self.busy
            for slot, seq, _ in group:
                if seq.out_index >= 0:
                    self._advance(slot, seq)
        return self.busy

    def _running(self) -> list[tuple[Slot, Sequence]]:
        return sorted(
            ((s, s.running) for s in self._slots if s.running is not None), key=lambda p: p[1].order
        )

    def _plan(self, running: list[tuple[Slot, Sequence]]) -> list[list[tuple[Slot, Sequence, int]]]:
        """This step's decodes: every decoding sequence's pending token, then prompt chunks (oldest request
        first) up to ``n_batch`` tokens in all. The pending tokens go in one decode, the chunks in one
        decode per chunk length, so that no prompt token is ever evaluated as its stream's only token in
        a ubatch beside streams of more (see the module doc); each decode is in slot order."""
        room = self._n_batch
        single: list[tuple[Slot, Sequence, int]] = []
        chunks: list[tuple[Slot, Sequence, int]] = []
        for slot, seq in running:
            seq.out_index = -1
            if not seq.prefilling:
                single.append((slot, seq, 1))
                room -= 1
        for slot, seq in running:
            if seq.prefilling and seq.awaits is None:
                take = chunk(len(seq.prompt) - seq.n_past, room)
                if take:
                    (single if take == 1 else chunks).append((slot, seq, take))
                    room -= take
                    self.evaluated_tokens += take
        by_length: dict[int, list[tuple[Slot, Sequence, int]]] = {}
        for item in chunks:
            by_length.setdefault(item[2], []).append(item)
        groups = [single] if single else []
        return groups + list(by_length.values())

    def _fill(self, group: list[tuple[Slot, Sequence, int]]) -> None:
        """Write ``group``'s tokens into the batch in slot order: llama.cpp's split KV cache computes one
        run of consecutive sequence ids per graph, so any other order would split the decode."""
        b, n = self._batch, 0
        for slot, seq, take in sorted(group, key=lambda p: p[0].seq_id):
            last = len(seq.tokens) - 1
            for pos in range(seq.n_past, seq.n_past + take):
                token = seq.tokens[pos]
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, pos == last
                b.seq_id[n][0] = slot.seq_id
                slot.cached.append(token)
                if pos == last:
                    seq.out_index = n
                n += 1
            seq.n_past += take
        b.n_tokens = n

    def _advance(self, slot: Slot, seq: Sequence) -> None:
        """Sample the sequence's next token and turn it into text, or finish the sequence."""
        try:
            token, logprob = seq.sampler.sample(self._ctx, seq.out_index)
        except LaminaError as exc:
            self._release(slot, seq, exc)
            return
        if self._vocab.is_end(token):  # not part of the answer, nor counted in its usage
            self._finish(slot, seq, "stop", seq.text.flush())
            return
        seq.generated += 1
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        seq.tokens.append(token)
        step = seq.text.feed(self._vocab.piece(token))
        if step.stopped:
            self._finish(slot, seq, "stop", step.text)
        elif (seq.params.max_tokens is not None and seq.generated >= seq.params.max_tokens) or len(
            seq.tokens
        ) >= self.n_ctx_seq:
            self._finish(slot, seq, "length", step.text + seq.text.flush())
        elif step.text or seq.pending_logprobs:
            seq.sink.put(Delta(step.text, logprobs=self._take_logprobs(seq)))

    @staticmethod
    def _take_logprobs(seq: Sequence) -> tuple[TokenLogprob, ...]:
        taken = tuple(seq.pending_logprobs)
        seq.pending_logprobs.clear()
        return taken

    def _finish(self, slot: Slot, seq: Sequence, reason: Any, text: str) -> None:
        usage = Usage(len(seq.prompt), seq.generated)
        seq.sink.put(Delta(text, reason, usage, self._take_logprobs(seq)))
        self._release(slot, seq, None)

    def _release(self, slot: Slot, seq: Sequence, failure: BaseException | None) -> None:
        """Free the slot; its cached tokens stay for the next request's prefix."""
        slot.running = None
        del slot.cached[seq.n_past :]
        self._end(seq, failure)

    def _forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached.clear()

    @staticmethod
    def _end(seq: Sequence, failure: BaseException | None) -> None:
        seq.sampler.close()
        try:
            if failure is not None:
                seq.sink.fail(failure)
        finally:
            seq.sink.close()

    def close(self) -> None:
        """Fail whatever is left and free the batch."""
        stopping = EngineError("the engine is shutting down; retry the request on another replica")
        for slot, seq in self._running():
            self._release(slot, seq, stopping)
        while self._waiting:
            self._end(self._waiting.popleft(), stopping)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
