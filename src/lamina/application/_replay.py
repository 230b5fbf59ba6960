"""What `lamina replay TRACE_ID` needs: each request's body and versions, kept by a policy, read back.

:class:`ReplayRecorder` is a :class:`~lamina.application._policy.Policy` (admits every call, refuses
none) and a :class:`~lamina.application._rag.QuerySink`. When a call settles with usage it keeps one
``replay_requests`` row under the request's trace id:

- ``body``: the request as the gateway forwarded it, after templates and input guards (a redacted input
  stays redacted), but *before* retrieval: the context passages a RAG request was grounded in are taken
  back out and the ``rag`` field is written with the dataset pinned to its exact version id, so a replay
  retrieves again from that same version (and shows whether the citations come out the same);
- ``versions``: model asked, deployment, model version, template, dataset and its version, seed;
- ``answer``: a summary of the plain answer (text, finish reason, citations, usage); streams keep none.

Rows are written by one background thread in small batches, never on the request path. Which rows stay is
the trace storage's business: its retention deletes a row with its trace (sampled-out traces included).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import trace
from sqlalchemy import select

from lamina.application._policy import Call, Usage
from lamina.application._rag import QuerySink, RagOptions, grounded_messages
from lamina.clock import Clock, utcnow
from lamina.data import Retrieval
from lamina.errors import ConflictError, NotFoundError, StoreError
from lamina.store import Store, insert_rows, replay_requests

log = logging.getLogger("lamina.replay")

#: the longest answer text kept (characters); the diff of a longer answer covers its start
MAX_ANSWER_CHARS = 8_000
#: retrievals waiting for their call to settle, at most (the oldest are forgotten beyond)
_PENDING_RETRIEVALS = 1_024
_ROUTES = {
    "chat": "/v1/chat/completions",
    "text_completion": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def _trace_id(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def ungrounded(messages: list[Any], retrieval: Retrieval) -> list[Any]:
    """``messages`` as they were before :func:`grounded_messages` added ``retrieval``'s passages."""
    context = grounded_messages([], retrieval)[0]["content"]
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        return messages
    first = messages[0].get("content")
    if first == context:
        return messages[1:]
    if isinstance(first, str) and first.endswith(f"\n\n{context}"):
        return [{**messages[0], "content": first[: -len(context) - 2]}, *messages[1:]]
    return messages


def answer_summary(answer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The part of a plain answer a replay compares: text, finish reason, citations, usage."""
    if answer is None:
        return None
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    text = message.get("content") if isinstance(message, dict) else first.get("text")
    citations = answer.get("citations")
    return {
        "text": text[:MAX_ANSWER_CHARS] if isinstance(text, str) else None,
        "finish_reason": first.get("finish_reason"),
        "citations": [
            {k: c.get(k) for k in ("index", "chunk_id", "source_uri", "dataset_version")}
            for c in (citations if isinstance(citations, list) else [])
            if isinstance(c, dict)
        ],
        "usage": answer.get("usage") if isinstance(answer.get("usage"), dict) else None,
    }


@dataclass(frozen=True)
class ReplayRecord:
    """One kept request."""

    trace_id: str
    created_at: datetime
    route: str
    body: dict[str, Any]
    versions: dict[str, Any]
    answer: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "created_at": self.created_at.isoformat(),
            "route": self.route,
            "body": self.body,
            "versions": self.versions,
            "answer": self.answer,
        }

    def pinned(self, routable: bool = True) -> dict[str, Any]:
        """The body to send again: the model pinned to its version (``NAME@VERSION`` when ``routable``,
        else the deployment that served it), never streamed (the answer is compared whole)."""
        body = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}
        version = self.versions.get("model_version")
        body["model"] = (
            version if routable and version else self.versions.get("deployment", body.get("model"))
        )
        return body


def read_replay(store: Store, trace_id: str) -> ReplayRecord:
    """The kept request of ``trace_id``; NotFoundError says why there may be none."""
    with store.begin() as conn:
        row = (
            conn.execute(select(replay_requests).where(replay_requests.c.trace_id == trace_id.lower()))
            .mappings()
            .first()
        )
    if row is None:
        raise NotFoundError(
            f"no kept request for trace {trace_id}: requests are kept for replay only with "
            "`observability.keep_requests: true` (and only while their trace is kept); "
            "`lamina traces` lists the stored traces"
        )
    return ReplayRecord(
        trace_id=row["trace_id"],
        created_at=row["created_at"],
        route=row["route"],
        body=dict(row["body"]),
        versions=dict(row["versions"]),
        answer=dict(row["answer"]) if row["answer"] is not None else None,
    )


class _Ticket:
    def __init__(self, recorder: ReplayRecorder, trace_id: str) -> None:
        self._recorder = recorder
        self._trace_id = trace_id

    async def settle(self, call: Call, usage: Usage | None) -> None:
        retrieval = self._recorder.take_retrieval(self._trace_id)
        if usage is not None:
            self._recorder.keep(self._trace_id, call, retrieval)


class ReplayRecorder:
    """Keeps each settled call's replay row (see the module doc); also the gateway's query sink, passing
    every retrieval on to ``inner`` (the drift window)."""

    #: its span in the request's trace
    step = "replay"

    def __init__(
        self,
        store: Store,
        inner: QuerySink | None = None,
        rag_aliases: Mapping[str, RagOptions] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._inner = inner
        self._aliases = dict(rag_aliases or {})
        self._clock = clock
        self._retrievals: OrderedDict[str, Retrieval] = OrderedDict()
        self._lock = threading.Lock()
        self._rows: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)
        self._writer = threading.Thread(target=self._write_forever, name="lamina-replay-writer", daemon=True)
        self._writer.start()

    # -- QuerySink ---------------------------------------------------------------------------------------

    def record(self, retrieval: Retrieval) -> None:
        with self._lock:
            self._retrievals[_trace_id(trace.get_current_span())] = retrieval
            while len(self._retrievals) > _PENDING_RETRIEVALS:
                self._retrievals.popitem(last=False)
        if self._inner is not None:
            self._inner.record(retrieval)

    def take_retrieval(self, trace_id: str) -> Retrieval | None:
        with self._lock:
            return self._retrievals.pop(trace_id, None)

    # -- Policy ------------------------------------------------------------------------------------------

    async def admit(self, call: Call) -> _Ticket:
        return _Ticket(self, _trace_id(call.span))

    def keep(self, trace_id: str, call: Call, retrieval: Retrieval | None) -> None:
        """Queue the row of a settled call (dropped, with a warning, when the writer is far behind)."""
        body = dict(call.body)
        versions: dict[str, Any] = {
            "model": call.model,
            "deployment": call.deployment,
            "model_version": call.model_version,
            "template": call.template,
            "seed": body.get("seed"),
            "stream": call.stream,
        }
        if retrieval is not None and isinstance(body.get("messages"), list):
            body["messages"] = ungrounded(body["messages"], retrieval)
            alias = self._aliases.get(call.model)
            rag: dict[str, Any] = {
                "dataset": f"{retrieval.version.dataset}@{retrieval.version.version_id}",
                "k": alias.k if alias else max(1, len(retrieval.citations)),
                "mode": retrieval.mode,
            }
            if alias is not None and alias.filters:
                rag["filters"] = dict(alias.filters)
            body["rag"] = rag
            versions.update(
                dataset=retrieval.version.dataset,
                dataset_version=retrieval.version.version_id,
                dataset_seq=retrieval.version.seq,
            )
        row = {
            "trace_id": trace_id,
            "created_at": self._clock(),
            "route": _ROUTES.get(call.operation, call.operation),
            "body": body,
            "versions": versions,
            "answer": answer_summary(call.answer),
        }
        try:
            self._rows.put_nowait(row)
        except queue.Full:
            log.warning("replay writer is behind: the request of trace %s is not kept", trace_id)

    def _write_forever(self) -> None:
        while True:
            row = self._rows.get()
            if row is None:
                return
            batch = [row]
            while len(batch) < 100:
                try:
                    more = self._rows.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._insert(batch)
                    return
                batch.append(more)
            self._insert(batch)

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        try:
            with self._store.begin() as conn:
                insert_rows(conn, replay_requests, batch)
        except ConflictError:  # a trace kept twice (a group's stream retried): the first row stays
            for row in batch if len(batch) > 1 else ():
                self._insert([row])
        except StoreError as exc:
            log.warning("lost %d replay rows: %s", len(batch), exc.message)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every row queued so far is written (tests; the gateway's shutdown)."""
        self._rows.put(None)
        self._writer.join(timeout_s)
        self._writer = threading.Thread(target=self._write_forever, name="lamina-replay-writer", daemon=True)
        self._writer.start()

    async def aclose(self) -> None:
        """Write what is queued and stop the writer (the gateway's shutdown)."""
        self._rows.put(None)
        await asyncio.to_thread(self._writer.join, 10.0)
