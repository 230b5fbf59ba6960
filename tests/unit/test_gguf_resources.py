"""What a GGUF replica asks of its node: the model's files and the KV cache of its parallel slots."""

from __future__ import annotations

from lamina.models import GGUFOptions
from lamina.models._builtin_engines import GGUF, kv_cache_bytes, parallel_slots
from lamina.models._engine import engine_descriptor
from tests.support import smollm2_path

#: SmolLM2-135M: 30 layers, 3 KV heads of 64 dimensions, keys and values in f16
SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 3 * (64 + 64) * 2


def test_parallel_slots_default_from_the_context() -> None:
    assert parallel_slots(GGUFOptions()) == 4
    assert parallel_slots(GGUFOptions(n_ctx=1024)) == 8
    assert parallel_slots(GGUFOptions(n_ctx=32768)) == 1
    assert parallel_slots(GGUFOptions(n_ctx=1024, parallel=3)) == 3


def test_the_kv_cache_follows_slots_and_context() -> None:
    path = smollm2_path()
    assert kv_cache_bytes(path, GGUFOptions(n_ctx=2048, parallel=8)) == SMOLLM2_KV_BYTES_PER_TOKEN * 2048 * 8
    # the context is capped at the 8192 tokens the model was trained for
    assert kv_cache_bytes(path, GGUFOptions(n_ctx=65536, parallel=1)) == SMOLLM2_KV_BYTES_PER_TOKEN * 8192
    small = GGUF.resources([path], GGUFOptions(n_ctx=1024, parallel=1))
    large = GGUF.resources([path], GGUFOptions(n_ctx=4096, parallel=8))
    grown = SMOLLM2_KV_BYTES_PER_TOKEN * (4096 * 8 - 1024) / 2**20
    assert abs(large.memory_mb - small.memory_mb - grown) <= 1  # each rounded up to whole MiB


def test_each_engine_says_how_many_requests_one_replica_runs_at_once() -> None:
    assert GGUF.slots(GGUFOptions(parallel=3)) == 3
    assert GGUF.slots(GGUFOptions(n_ctx=8192)) == parallel_slots(GGUFOptions(n_ctx=8192)) == 2
    remote = engine_descriptor("openai")
    upstream = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrency": 12}
    assert remote.slots(remote.parse_options(upstream, "test")) == 12
    fake = engine_descriptor("fake")
    assert fake.slots(fake.parse_options({}, "test")) == 1  # one request at a time, the default
