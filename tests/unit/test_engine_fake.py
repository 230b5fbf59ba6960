"""The fake engine: a real plugin (found through the entry point) that echoes or replays words."""

from __future__ import annotations

import numpy as np
import pytest

from lamina.errors import ConfigError
from lamina.models import Capability, ChatMessage, LoadSpec, SamplingParams, load_engine
from lamina.models._fake import FakeEngine, split_words
from lamina.models._stops import StopScanner


def fake(**options: object) -> FakeEngine:
    engine = load_engine("fake", LoadSpec(name="echo", path=None, options=dict(options)))
    assert isinstance(engine, FakeEngine)
    return engine


def test_echo_chat_answers_with_the_last_user_message() -> None:
    messages = [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "first question"),
        ChatMessage("assistant", "an answer"),
        ChatMessage("user", "the  second question, please"),
    ]
    deltas = list(fake().chat(messages, SamplingParams()))
    assert len(deltas) > 3
    assert "".join(d.text for d in deltas) == "the  second question, please"
    final = deltas[-1]
    assert final.finish_reason == "stop" and final.usage is not None
    assert final.usage.prompt_tokens == 2 + 2 + 2 + 4
    assert final.usage.completion_tokens == 4
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_replay_completion_and_max_tokens() -> None:
    engine = fake(mode="replay", tokens=["a", " b", " c", " d"])
    full = list(engine.complete("ignored prompt", SamplingParams()))
    assert "".join(d.text for d in full) == "a b c d"
    assert full[-1].finish_reason == "stop"
    short = list(engine.complete("ignored prompt", SamplingParams(max_tokens=2)))
    assert "".join(d.text for d in short) == "a b"
    assert short[-1].finish_reason == "length"
    assert short[-1].usage is not None and short[-1].usage.completion_tokens == 2


def test_a_stop_string_split_over_tokens_is_never_sent() -> None:
    engine = fake(mode="replay", tokens=["Hello", " wor", "ld", " and", " more"])
    deltas = list(engine.complete("x", SamplingParams(stop=("world",))))
    assert "".join(d.text for d in deltas) == "Hello "
    assert not any("wor" in d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        ((), ["ab", "cd"], "abcd"),
        (("x",), ["ab", "cd"], "abcd"),
        (("cd",), ["ab", "cd", "ef"], "ab"),
        (("bc",), ["ab", "cd"], "a"),
        (("abc",), ["ab", "ab", "x"], "ababx"),
        (("END", "b"), ["aa", "ab"], "aaa"),
    ],
)
def test_stop_scanner(stops: tuple[str, ...], pieces: list[str], expected: str) -> None:
    scanner, out = StopScanner(stops), []
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            break
    else:
        out.append(scanner.flush())
    assert "".join(out) == expected


def test_count_tokens_counts_words() -> None:
    engine = fake()
    assert engine.count_tokens("one two  three\nfour") == 4
    assert engine.count_tokens("") == 0
    assert engine.count_chat_tokens([ChatMessage("user", "a b"), ChatMessage("assistant", "c")]) == 3
    assert split_words(" a  b c") == [" a", "  b", " c"]


def test_embeddings_are_deterministic_unit_vectors() -> None:
    engine = fake(embedding_dim=8)
    batch = engine.embed(["alpha", "beta", "alpha"])
    vectors = np.array(batch.vectors)
    assert vectors.shape == (3, 8)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    assert np.allclose(fake(embedding_dim=8).embed(["alpha"]).vectors[0], vectors[0])
    assert batch.prompt_tokens == 3


def test_info_claims_what_it_honours() -> None:
    info = fake(n_ctx=64, embedding_dim=4).info()
    # chat, completion, embeddings and streams; no log probabilities, grammars, penalties or batching,
    # so requests that ask for those are refused instead of silently answered without them
    basic = {Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING, Capability.STREAMING}
    assert info.capabilities == basic
    assert info.context_length == 64 and info.embedding_dim == 4 and info.engine == "fake"


def test_bad_options_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mode"):
        fake(mode="shout")
