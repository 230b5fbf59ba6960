"""The demo: Lamina's own documentation (``lamina/demo_docs``) as a dataset and a RAG alias.

On the gateway's start, when ``demo`` is on and the dataset does not exist yet, the pages are ingested in a
worker thread (the admin API's ingest service, confined to the package's own folder): readiness never
waits for it, a failure is logged and changes nothing else, and a later start finds the dataset and
ingests nothing. The alias answers from the newest version of the dataset with the first chat deployment
(or ``demo.model``); until the first version is committed it answers with the dataset's "not found" error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lamina.application import IngestSettings, RagOptions, ThreadedIngestService
from lamina.config import LaminaConfig
from lamina.errors import LaminaError
from lamina.models import Catalog
from lamina.stack._data import DataStack

log = logging.getLogger("lamina.demo")


def demo_docs() -> Path:
    """The folder of Markdown pages shipped in the package."""
    return Path(str(resources.files("lamina").joinpath("demo_docs")))


@dataclass(frozen=True)
class DemoAlias:
    name: str
    model: str
    options: RagOptions


def demo_alias(config: LaminaConfig, catalog: Catalog) -> DemoAlias | None:
    """The demo's RAG alias, or None: demo off, no chat deployment, or its name already taken."""
    demo = config.demo
    if not demo.on(config.register_bundled):
        return None
    taken = (
        {d.name for d in config.deployments} | {a.name for a in config.rag} | {g.name for g in config.groups}
    )
    if demo.alias in taken:
        log.warning("demo: the name %r is taken in lamina.yaml; the demo alias is not served", demo.alias)
        return None
    chat = [m.id for m in catalog.models() if "chat" in m.capabilities]
    model = demo.model or next(iter(chat), None)
    if model is None or model not in chat:
        log.info("demo: no chat deployment to answer from; the demo alias is not served")
        return None
    return DemoAlias(demo.alias, model, RagOptions(dataset=demo.dataset, k=demo.k, mode="hybrid"))


class DemoIngest:
    """Ingests the demo pages once, in the background; :meth:`close` stops a run that is under way."""

    def __init__(self, config: LaminaConfig, data: DataStack) -> None:
        self._config = config
        self._data = data
        self._service: ThreadedIngestService | None = None

    def start(self) -> str | None:
        """Start the ingest unless the demo is off or its dataset exists; the run id, else None."""
        demo = self._config.demo
        if not demo.on(self._config.register_bundled):
            return None
        try:
            if self._data.catalog.log(demo.dataset):
                return None
            folder = demo_docs()
            self._service = ThreadedIngestService(
                self._data.pipeline, self._data.catalog, self._config.data, [folder], max_workers=1
            )
            run = self._service.start(demo.dataset, [str(folder / "*.md")], IngestSettings())
        except LaminaError as exc:
            log.warning("demo: could not start ingesting Lamina's documentation: %s", exc.message)
            return None
        log.info("demo: ingesting Lamina's documentation as the dataset %r (run %s)", demo.dataset, run)
        return run

    def status(self, run_id: str) -> dict[str, object]:
        assert self._service is not None
        return self._service.status(run_id)

    def close(self) -> None:
        if self._service is not None:
            self._service.close()

    async def aclose(self, started: asyncio.Task[str | None]) -> None:
        """Wait for ``start`` (it only checks and queues) and stop the run if it is still going."""
        with contextlib.suppress(Exception):
            await started
        await asyncio.to_thread(self.close)


def rag_aliases(config: LaminaConfig, catalog: Catalog) -> dict[str, tuple[str, RagOptions]]:
    """The gateway's RAG aliases: the config's, and the demo's when it is on."""
    aliases = {a.name: (a.model, RagOptions(dataset=a.dataset, k=a.k, mode=a.mode)) for a in config.rag}
    demo = demo_alias(config, catalog)
    if demo is not None:
        aliases[demo.name] = (demo.model, demo.options)
    return aliases
