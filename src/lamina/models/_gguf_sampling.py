"""One sequence's sampling and output text in the GGUF engine: llama.cpp's sampler chain, log probabilities,
and the bytes-to-text step that holds back half characters and the beginnings of stop strings.

Each sequence owns its sampler chain (its own temperature, top_p, penalties, logit bias, grammar and seed),
so sequences decoded in one batch never share sampling state.
"""

from __future__ import annotations

import codecs
import ctypes
import random
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from lamina.errors import InvalidRequestError
from lamina.models._engine import SamplingParams, TokenLogprob, TopLogprob
from lamina.models._stops import StopScanner


class Vocab:
    """The model's vocabulary as the sampler and the text step need it."""

    def __init__(self, vocab: Any) -> None:
        self.handle = vocab
        self.size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        #: every token id, in order: the id column of a full candidate list
        self.ids = np.arange(self.size, dtype=np.int32)
        self._pieces: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in output text (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.handle, token, buf, size, 0, False)
            if n >= 0:
                break
            size = -n
        out = buf.raw[:n]
        self._pieces[token] = out
        return out

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.handle, token))


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Sampler:
    """A llama.cpp sampler chain built from one request's parameters; freed with :meth:`close`.

    A grammar sits outside the chain and is checked the way llama.cpp's own server does it: the chain picks
    a token from the raw logits, the grammar checks that one token, and only when the grammar refuses it
    is the grammar applied to the whole vocabulary and the token picked again. Constraining every step in
    full would cost about a hundred times more.
    """

    def __init__(self, vocab: Vocab, params: SamplingParams, seed: int, history: int) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._grammar: Any = None
        #: a greedy pick with nothing before it: numpy's argmax over the logits, a tenth of the chain's cost
        #: (which copies the whole vocabulary into a candidate list first)
        self._argmax = False
        self._vocab = vocab
        try:
            self._build(params, seed, history)
        except BaseException:
            self.close()
            raise
        self._top = params.logprobs

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, params: SamplingParams, seed: int, history: int) -> None:
        v = self._vocab
        if params.logit_bias:
            for token, _ in params.logit_bias:
                if not 0 <= token < v.size:
                    raise InvalidRequestError(
                        f"logit_bias names token {token}, but this model's vocabulary has tokens 0 to "
                        f"{v.size - 1}; remove it",
                        param="logit_bias",
                    )
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                *(llama_cpp.llama_logit_bias(t, b) for t, b in params.logit_bias)
            )
            self._add(llama_cpp.llama_sampler_init_logit_bias(v.size, len(params.logit_bias), biases))
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI's penalties: logit -= frequency * count + presence * (count > 0), over the answer so far
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    v.size, history, 1.0, params.frequency_penalty, params.presence_penalty
                )
            )
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(v.handle, params.grammar.encode(), b"root")
            if not grammar:
                raise InvalidRequestError(
                    "llama.cpp could not parse the grammar built for this request; simplify the JSON "
                    "schema or the tool parameters",
                    param="response_format",
                )
            self._grammar = grammar
        if params.temperature == 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            # nothing before the pick: the first highest logit (as llama.cpp's greedy sampler takes it)
            self._argmax = params.grammar is None and not (
                params.logit_bias or params.presence_penalty or params.frequency_penalty
            )
            return
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Any, index: int) -> tuple[int, TokenLogprob | None]:
        """The next token from the logits at ``index`` of the last batch, and its log probabilities
        (of the model's own distribution, before penalties, bias, grammar or temperature) when asked."""
        logprobs = None
        if self._top is not None:
            raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._vocab.size,))
            shifted = raw.astype(np.float64) - raw.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
        if self._argmax:
            row = llama_cpp.llama_get_logits_ith(ctx, index)
            token = int(np.ctypeslib.as_array(row, shape=(self._vocab.size,)).argmax())
        elif self._grammar is None:
            token = int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        else:
            token = self._constrained(ctx, index)
        return token, None if logprobs is None else self._record(logprobs, token)

    def _constrained(self, ctx: Any, index: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._vocab.size,))
        token = self._pick(logits, grammar_first=False)
        one = np.zeros(1, dtype=_TOKEN_DATA)
        one["id"], one["logit"] = token, logits[token]
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(_candidates(one)))
        if np.isneginf(one["logit"][0]):  # the grammar refuses it: pick again among what it allows
            token = self._pick(logits, grammar_first=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits: Any, *, grammar_first: bool) -> int:
        data = np.empty(logits.size, dtype=_TOKEN_DATA)
        data["id"] = self._vocab.ids
        data["p"] = 0.0
        data["logit"] = logits
        candidates = _candidates(data)
        if grammar_first:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))
        return int(data["id"][candidates.selected])

    def _record(self, logprobs: Any, token: int) -> TokenLogprob:
        top: tuple[TopLogprob, ...] = ()
        if self._top:
            k = min(self._top, logprobs.size)
            best = np.argpartition(-logprobs, k - 1)[:k]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(self._top_entry(int(t), float(logprobs[t])) for t in best)
        piece = self._vocab.piece(token)
        return TokenLogprob(piece.decode("utf-8", "replace"), float(logprobs[token]), tuple(piece), top)

    def _top_entry(self, token: int, logprob: float) -> TopLogprob:
        piece = self._vocab.piece(token)
        return TopLogprob(piece.decode("utf-8", "replace"), logprob, tuple(piece))

    def close(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self._chain = self._grammar = None


def _candidates(data: Any) -> Any:
    """A ``llama_token_data_array`` over a numpy array of ``_TOKEN_DATA`` (which must outlive it)."""
    pointer = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
    return llama_cpp.llama_token_data_array(data=pointer, size=data.size, selected=-1, sorted=False)


@dataclass
class TextStep:
    """What one token adds to the answer: text safe to send, and whether a stop string ended it."""

    text: str
    stopped: bool


class TextOutput:
    """Token bytes to answer text: complete UTF-8 characters only, cut at the first stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = StopScanner(stops)

    def feed(self, piece: bytes) -> TextStep:
        text, stopped = self._stops.feed(self._decoder.decode(piece))
        return TextStep(text, stopped)

    def flush(self) -> str:
        """What was held back, once generation ended without a stop string."""
        text, stopped = self._stops.feed(self._decoder.decode(b"", final=True))
        return text if stopped else text + self._stops.flush()


def seed_for(params: SamplingParams, default: int) -> int:
    """The request's seed, else the engine's (``-1``: a fresh random one)."""
    if params.seed is not None:
        return params.seed
    return default if default >= 0 else random.randrange(2**31)
