"""A request's ``traceparent``: read by W3C's rules, and a caller's sampled flag kept within its cap."""

from __future__ import annotations

import pytest

from lamina.observability import Kept, SamplingPolicy, TraceSampler, caller_of

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_a_valid_traceparent_names_the_callers_span_and_its_sampled_flag() -> None:
    ctx = caller_of(f"00-{TRACE}-{SPAN}-01".encode())
    assert ctx is not None and ctx.is_remote
    assert (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), ctx.trace_flags.sampled) == (
        TRACE,
        SPAN,
        True,
    )
    unsampled = caller_of(f"00-{TRACE}-{SPAN}-00".encode())
    assert unsampled is not None and not unsampled.trace_flags.sampled
    later = caller_of(f"cc-{TRACE}-{SPAN}-09-what-a-later-version-adds".encode())  # read by its first fields
    assert later is not None and later.trace_flags.sampled


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-{SPAN}-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # an all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex
        f"ff-{TRACE}-{SPAN}-01",  # the version that is never valid
        f"00-{TRACE}-{SPAN}-01-more",  # version 00 has nothing after its flags
        f"00-{TRACE}-{SPAN}-0",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}g-{SPAN}-01",
        "",
        "not a traceparent at all, but long enough to be read as one if unchecked",
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    assert caller_of(value.encode()) is None


def test_a_trace_its_caller_sampled_is_kept_within_a_cap_of_its_own() -> None:
    now = [0.0]
    sampler = TraceSampler(SamplingPolicy(per_s=0.0), clock=lambda: now[0])
    assert sampler.decide(error=False, duration_ms=5) is None  # ordinary traces: never, at per_s 0
    kept = [sampler.decide(error=False, duration_ms=5, caller_sampled=True) for _ in range(120)]
    assert kept.count(Kept.SAMPLED) == 100 and kept[-1] is None  # 10 a second, 10 seconds' burst
    now[0] += 1.0
    assert sampler.decide(error=False, duration_ms=5, caller_sampled=True) is Kept.SAMPLED
    assert sampler.decide(error=True, duration_ms=5, caller_sampled=False) is Kept.ERROR
