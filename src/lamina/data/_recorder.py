"""Retrieval meets drift: the gateway's query sink samples each retrieval's query into the drift window."""

from __future__ import annotations

import concurrent.futures
import logging

from lamina.data._retrieve import Retrieval
from lamina.data.drift import DriftWindow


class DriftRecorder:
    """The gateway's query sink: offers each retrieval's query to the drift window, off the request path.

    Recording is a small synchronous transaction, so it runs on one background thread; a failure is
    logged and never reaches the request that triggered it.
    """

    def __init__(self, window: DriftWindow) -> None:
        self._window = window
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lamina-drift")

    def record(self, retrieval: Retrieval) -> None:
        if retrieval.query_vector is None:  # keyword-only search: no embedding to sample
            return
        future = self._pool.submit(
            self._window.record, retrieval.version.dataset, retrieval.query, retrieval.query_vector
        )
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _log_failure(future: concurrent.futures.Future[bool]) -> None:
    exc = future.exception()
    if exc is not None:
        logging.getLogger(__name__).warning("could not record a query in the drift window: %s", exc)
