"""Where one request's time went, per layer: the self time of its spans, summed by ``lamina.layer``.

A span's self time is its duration less the parts of it its children cover (each child clipped to its
parent), so nested spans of different layers never count twice: the ``dispatch`` span (orchestration)
minus the replica's reported ``engine`` span (models) is the network and the dispatcher's own work. A
span still running counts up to now. The numbers sum to the root span's duration.

The ``x-lamina-layers`` header carries them as ``layer=ms`` pairs joined by ``;``, always all five layers
in the order of :data:`LAYERS`, milliseconds with up to three decimals, e.g.
``application=0.812;data=0;models=41.207;orchestration=0.311;compute=0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

#: the layers in the order the header and the ``lamina`` extension list them
LAYERS = ("application", "data", "models", "orchestration", "compute")


class Timed(NamedTuple):
    """One span as the breakdown sees it (times in epoch nanoseconds; ``end_ns`` None: still running)."""

    span_id: int
    parent_id: int | None
    layer: str | None
    start_ns: int
    end_ns: int | None


class Breakdown:
    """Milliseconds per layer (every layer of :data:`LAYERS` present) and the one that took longest.
    Made once per answer (the header, the body and the metrics read the same one): a plain class.

    On the request path it is made from whole microseconds per layer (:meth:`of_us`, in the order of
    :data:`LAYERS`), and the texts come from a table of the numbers' strings: the dict of floats is made
    only if asked for (``layers``)."""

    __slots__ = ("_bottleneck", "_header", "_json", "_layers", "_total_us", "micros", "total_ms")

    def __init__(self, layers: dict[str, float], total_ms: float) -> None:
        self._layers: dict[str, float] | None = layers
        #: whole microseconds per layer, in the order of :data:`LAYERS`
        self.micros = tuple([max(round(layers.get(layer, 0.0) * 1000), 0) for layer in LAYERS])
        self.total_ms = total_ms
        self._total_us = max(int(total_ms * 1000 + 1e-6), 0)  # whole microseconds: not rounded up
        self._header: bytes | None = None
        self._json: bytes | None = None
        self._bottleneck: str | bool | None = False

    @classmethod
    def of_us(cls, us: tuple[int, ...], total_us: int) -> Breakdown:
        """Whole microseconds per layer (in the order of :data:`LAYERS`, none below 0) and in all."""
        made = cls.__new__(cls)
        made.micros, made._layers, made.total_ms, made._total_us = us, None, total_us / 1000, total_us
        made._header = made._json = None
        made._bottleneck = False
        return made

    @property
    def layers(self) -> dict[str, float]:
        if self._layers is None:
            self._layers = dict(zip(LAYERS, [u / 1000 for u in self.micros], strict=True))
        return self._layers

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Breakdown):
            return NotImplemented
        return self.layers == other.layers and self.total_ms == other.total_ms

    def __repr__(self) -> str:
        return f"Breakdown({self.layers!r}, {self.total_ms!r})"

    @property
    def bottleneck(self) -> str | None:
        if self._bottleneck is False:
            us = self.micros
            most = max(us)  # the first of equals, in the order of LAYERS
            self._bottleneck = LAYERS[us.index(most)] if most > 0 else None
        return self._bottleneck  # type: ignore[return-value]

    def header(self) -> str:
        """The ``x-lamina-layers`` value."""
        return self.header_bytes().decode()

    def header_bytes(self) -> bytes:
        """The ``x-lamina-layers`` value, as sent."""
        if self._header is None:
            self._texts()
        return self._header  # type: ignore[return-value]

    def json(self) -> bytes:
        """:meth:`as_json` as compact JSON (the same numbers as the header, formatted once)."""
        if self._json is None:
            self._texts()
        return self._json  # type: ignore[return-value]

    def _texts(self) -> None:
        """The header's and the extension's texts, written once on the request path (f-strings and
        comparisons: a ``%`` template, ``max`` and ``index`` cost twice as much)."""
        get = _TEXTS.get
        app, data, models, orch, compute = self.micros
        a = get(app) or _text(app)
        d = get(data) or _text(data)
        m = get(models) or _text(models)
        o = get(orch) or _text(orch)
        c = get(compute) or _text(compute)
        t = get(self._total_us) or _text(self._total_us)
        most, name = app, '"application"'  # the first of equals, in the order of LAYERS
        if data > most:
            most, name = data, '"data"'
        if models > most:
            most, name = models, '"models"'
        if orch > most:
            most, name = orch, '"orchestration"'
        if compute > most:
            most, name = compute, '"compute"'
        if most <= 0:
            name = "null"
        self._header = f"application={a};data={d};models={m};orchestration={o};compute={c}".encode()
        self._json = (
            f'{{"layers":{{"application":{a},"data":{d},"models":{m},"orchestration":{o},"compute":{c}}},'
            f'"bottleneck":{name},"total_ms":{t}}}'
        ).encode()

    def as_json(self) -> dict[str, Any]:
        """The ``lamina`` extension of an answer: ``{"layers": {layer: ms}, "bottleneck", "total_ms"}``."""
        total = round(self.total_ms, 3)
        return {"layers": dict(self.layers), "bottleneck": self.bottleneck, "total_ms": total}


#: the texts of 0 to 9.999 ms, by whole microseconds, kept as they are first written
_TABLE = 10_000
_TEXTS: dict[int, str] = {}
#: a millisecond's microseconds as decimals: "" for 0, ".25" for 250, ".007" for 7
_DECIMALS = ["", *[f".{r:03d}".rstrip("0") for r in range(1, 1000)]]


def _text(us: int) -> str:
    """Whole microseconds as the header writes milliseconds: ``0``, or the shortest form with up to 3
    decimals (``0.25``, ``41.207``); remembered when under 10 ms."""
    ms, rest = divmod(us, 1000)
    text = f"{ms}{_DECIMALS[rest]}"
    if 0 <= us < _TABLE:
        _TEXTS[us] = text
    return text


def parse_header(value: str) -> dict[str, float]:
    """The ``x-lamina-layers`` header back as ``{layer: ms}`` (a client's helper; ValueError if malformed)."""
    out: dict[str, float] = {}
    for pair in value.split(";"):
        name, sep, ms = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"not a layer=ms pair: {pair!r}")
        out[name.strip()] = float(ms)
    return out


def breakdown(spans: Iterable[Timed], root_id: int, now_ns: int) -> Breakdown:
    """The per-layer self time of the trace rooted at ``root_id`` (a span of ``spans``), running ones up to
    ``now_ns``. Spans whose parent is not among ``spans`` are taken as children of the root."""
    by_id: dict[int, Timed] = {}
    for s in spans:
        by_id[s.span_id] = s
    root = by_id[root_id]
    children: dict[int, list[Timed]] = {}
    for s in by_id.values():
        if s.span_id == root_id:
            continue
        parent = s.parent_id if s.parent_id in by_id else root_id
        children.setdefault(parent, []).append(s)
    totals = dict.fromkeys(LAYERS, 0.0)
    root_end = root.end_ns if root.end_ns is not None else now_ns
    _walk(root, root.start_ns, root_end, children, totals, now_ns, "application")
    total = max(root_end - root.start_ns, 0) / 1e6
    return Breakdown({k: round(v / 1e6, 3) for k, v in totals.items()}, total)


def _walk(
    span: Timed,
    lo: int,
    hi: int,
    children: Mapping[int, list[Timed]],
    totals: dict[str, float],
    now_ns: int,
    inherited: str,
) -> None:
    """Add ``span``'s self time within [lo, hi] to its layer (a span without one takes its parent's)."""
    start = max(span.start_ns, lo)
    end = min(span.end_ns if span.end_ns is not None else now_ns, hi)
    if end <= start:
        return
    layer = span.layer if span.layer in totals else inherited
    covered = 0
    for child in children.get(span.span_id, ()):
        c_start = max(child.start_ns, start)
        c_end = min(child.end_ns if child.end_ns is not None else now_ns, end)
        if c_end > c_start:
            covered += c_end - c_start
            _walk(child, start, end, children, totals, now_ns, layer)
    totals[layer] += max(end - start - covered, 0)
