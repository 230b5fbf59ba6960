"""OpenLineage run events for ingest runs: START, COMPLETE and FAIL, to a JSONL log and optionally HTTP.

Each event is a ``RunEvent`` of the OpenLineage 2-0-2 spec: ``eventType``, ``eventTime``, ``run.runId``
(the ingest run's UUID), ``job`` (namespace from the config, name ``ingest.<dataset>``), ``inputs`` (the
source roots, namespace ``file``) and ``outputs`` (the dataset, namespace ``lamina``), ``producer`` and
``schemaURL``. The output carries the standard ``version`` dataset facet (``DatasetVersionDatasetFacet``)
with the committed version id; a FAIL carries the ``errorMessage`` run facet.

Every event is appended to ``lineage/openlineage.jsonl`` in the state directory, always. With an
endpoint configured it is also POSTed to ``<url>/api/v1/lineage`` (the path the OpenLineage HTTP transport
and Marquez use). A lineage server that is down must not fail an ingest: a failed POST is logged and the
event stays in the JSONL log, from which it can be replayed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from lamina.clock import Clock, utcnow
from lamina.data.versions import code_version

log = logging.getLogger("lamina.data")

EventType = Literal["START", "COMPLETE", "FAIL"]
PRODUCER = f"https://github.com/lamina-ai/lamina/tree/v{code_version()}"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
_VERSION_FACET = "https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet"
_ERROR_FACET = (
    "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
)
_LINEAGE_PATH = "/api/v1/lineage"


def _facet(schema_url: str, **fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": schema_url, **fields}


class LineageEmitter:
    """Writes OpenLineage run events for ingest runs.

    ``url``: the OpenLineage endpoint base, or None for the JSONL log only; ``client``: the HTTP client
    (one is made when a URL is given and none is passed).
    """

    def __init__(
        self,
        log_path: Path,
        *,
        namespace: str = "lamina",
        url: str | None = None,
        client: httpx.Client | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._path = log_path
        self._namespace = namespace
        self._url = None if url is None else url.rstrip("/") + _LINEAGE_PATH
        self._client = client if client is not None or url is None else httpx.Client(timeout=10.0)
        self._clock = clock

    def event(
        self,
        event_type: EventType,
        run_id: str,
        dataset: str,
        *,
        inputs: Sequence[str],
        version_id: str | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Build, log and send one event; returns it."""
        output: dict[str, Any] = {"namespace": self._namespace, "name": dataset, "facets": {}}
        if version_id is not None:
            output["facets"]["version"] = _facet(_VERSION_FACET, datasetVersion=version_id)
        run_facets: dict[str, Any] = {}
        if error is not None:
            run_facets["errorMessage"] = _facet(_ERROR_FACET, message=error, programmingLanguage="python")
        event = {
            "eventType": event_type,
            "eventTime": self._clock().isoformat(),
            "run": {"runId": run_id, "facets": run_facets},
            "job": {"namespace": self._namespace, "name": f"ingest.{dataset}", "facets": {}},
            "inputs": [{"namespace": "file", "name": root, "facets": {}} for root in inputs],
            "outputs": [output],
            "producer": PRODUCER,
            "schemaURL": SCHEMA_URL,
        }
        self._append(event)
        self._send(event)
        return event

    def _append(self, event: dict[str, Any]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")

    def _send(self, event: dict[str, Any]) -> None:
        if self._url is None or self._client is None:
            return
        try:
            response = self._client.post(self._url, json=event)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(
                "OpenLineage endpoint %s refused the %s event: %s", self._url, event["eventType"], exc
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
