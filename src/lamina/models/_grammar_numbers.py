"""GBNF for bounded integers and numbers: the JSON Schema keywords ``minimum``, ``maximum``,
``exclusiveMinimum`` and ``exclusiveMaximum``, which the schema converter of llama-cpp-python 0.3.36 ignores.

An integer range becomes an alternation over digit counts, each split digit by digit (the construction
regex range generators use): 0..255 is ``[0-9] | [1-9] [0-9]{1} | "1" ... | "2" ("5" [0-5] | ...)``. A number
(a decimal, no exponent) is bounded through its integer part, with the fraction constrained at the ends: under
``maximum: 1`` the integer part 1 takes only zeros after the point. Bounds on numbers must be whole and the
lower one not negative (``ge=0, le=1`` for a score, ``gt=0`` for a price); others are refused with a
ValueError that says so, never enforced loosely. Numerals have at most 16 digits, as in the converter's own
integer rule.
"""

from __future__ import annotations

import math

_DIGITS = 16
_ANY_FRACTION = '("." [0-9]{1,15})?'
_ZERO_FRACTION = '("." "0"{1,15})?'
_NONZERO_FRACTION = '"." [0-9]{0,14} [1-9] [0-9]{0,14}'


def _group(alternatives: list[str]) -> str:
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"


def _same_width(lo: str, hi: str) -> list[str]:
    """Alternatives matching every numeral from ``lo`` to ``hi``, both of one width (leading zeros kept)."""
    if lo == hi:
        return [f'"{lo}"']
    rest = len(lo) - 1
    tail = f" [0-9]{{{rest}}}" if rest else ""
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return [(f"[{lo[0]}-{hi[0]}]" if lo[0] != hi[0] else f'"{lo[0]}"') + tail]
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" ' + _group(_same_width(lo[1:], hi[1:]))]
    out = [f'"{lo[0]}" ' + _group(_same_width(lo[1:], "9" * rest))]
    if int(hi[0]) - int(lo[0]) > 1:
        middle = int(lo[0]) + 1, int(hi[0]) - 1
        out.append((f"[{middle[0]}-{middle[1]}]" if middle[0] < middle[1] else f'"{middle[0]}"') + tail)
    out.append(f'"{hi[0]}" ' + _group(_same_width("0" * rest, hi[1:])))
    return out


def _naturals(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching the numerals (no leading zeros) of ``lo`` .. ``hi``; None: no upper bound."""
    out: list[str] = []
    width = len(str(lo))
    top = 10**width - 1
    while hi is None or lo <= hi:
        out += _same_width(str(lo), str(top if hi is None else min(hi, top)))
        if hi is None:
            if width < _DIGITS:
                out.append(f"[1-9] [0-9]{{{width},{_DIGITS - 1}}}")
            return out
        lo, width, top = top + 1, width + 1, 10 ** (width + 1) - 1
    return out


def _checked(bound: float | None, what: str) -> None:
    if bound is not None and abs(bound) >= 10**_DIGITS:
        raise ValueError(
            f"the {what} {bound} has more than {_DIGITS} digits; numerals here have at most that"
        )


def integer_rule(lo: float | None, hi: float | None) -> str:
    """A GBNF expression for the integers from ``lo`` to ``hi`` (inclusive; None: unbounded)."""
    low = None if lo is None else math.ceil(lo)
    high = None if hi is None else math.floor(hi)
    _checked(low, "lower bound")
    _checked(high, "upper bound")
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer lies between the bounds {lo} and {hi}")
    alternatives = []
    if high is None or high >= 0:
        alternatives += _naturals(max(low, 0) if low is not None else 0, high)
    if low is None or low < 0:
        magnitudes = _naturals(max(1, -high) if high is not None else 1, None if low is None else -low)
        alternatives.append('"-" ' + _group(magnitudes))
    return _group(alternatives)


def number_rule(lo: float | None, lo_exclusive: bool, hi: float | None, hi_exclusive: bool) -> str:
    """A GBNF expression for the decimals between ``lo`` and ``hi`` (None: unbounded), each bound inclusive
    unless marked exclusive. Bounds must be whole, the lower one not negative; else a ValueError."""
    for bound, what in ((lo, "lower bound"), (hi, "upper bound")):
        if bound is not None and (bound != int(bound) or bound < 0):
            raise ValueError(
                f"the {what} {bound} of a number cannot be enforced: bounds on numbers must be whole and not "
                "negative (use type integer, or drop the bound)"
            )
        _checked(bound, what)
    low = None if lo is None else int(lo)
    high = None if hi is None else int(hi)
    if (
        low is not None
        and high is not None
        and (low > high or (low == high and (lo_exclusive or hi_exclusive)))
    ):
        raise ValueError(f"no number lies between the bounds {lo} and {hi}")
    alternatives = []
    # integer parts that take any fraction
    first = 0 if low is None else low + 1 if lo_exclusive else low
    last = None if high is None else high - 1
    if last is None or first <= last:
        alternatives.append(_group(_naturals(first, last)) + " " + _ANY_FRACTION)
    if low is not None and lo_exclusive:
        alternatives.append(f'"{low}" {_NONZERO_FRACTION}')
    if high is not None and not hi_exclusive:
        alternatives.append(f'"{high}" {_ZERO_FRACTION}')
    if low is None:
        alternatives.append(f'"-" ([1-9] [0-9]{{0,15}} {_ANY_FRACTION} | "0" {_NONZERO_FRACTION})')
    return _group(alternatives)
