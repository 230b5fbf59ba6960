"""The names a key's model and dataset lists can match, so that ``lamina keys create`` can say when one of
them names nothing this stack knows (a typo that would otherwise surface as a 403 on the first call)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lamina.config import LaminaConfig
from lamina.data import DatasetCatalog
from lamina.stack._data import registry_of
from lamina.stack._deployment_store import DeploymentStore
from lamina.store import Store


def model_names(config: LaminaConfig, store: Store, state_dir: Path) -> set[str]:
    """Every name a request's ``model`` may give here now: deployments (the config's and those made with
    ``lamina deploy``), model groups, RAG aliases (the demo's too), and registered models by name, by
    ``name@version`` and by ``name@alias``."""
    names = {d.name for d in config.deployments} | {g.name for g in config.groups}
    names |= {a.name for a in config.rag} | {d.name for d in DeploymentStore(store).list()}
    if config.demo.on(config.register_bundled):
        names.add(config.demo.alias)
    for version in registry_of(store, state_dir).list():
        names |= {version.name, f"{version.name}@{version.version}"}
        names |= {f"{version.name}@{alias}" for alias in version.aliases}
    return names


def dataset_names(config: LaminaConfig, store: Store) -> set[str]:
    """Every dataset stored here, and the demo's (ingested on the stack's first start)."""
    names = set(DatasetCatalog(store).names())
    if config.demo.on(config.register_bundled):
        names.add(config.demo.dataset)
    return names


def unknown_names(
    config: LaminaConfig, store: Store, state_dir: Path, models: Iterable[str], datasets: Iterable[str]
) -> list[str]:
    """A line for each of ``models`` and ``datasets`` (a key's lists) that names nothing here now, saying
    what does; empty when every name is known. A dataset may be given as ``NAME@VERSION``."""
    lines = []
    models = list(models)
    if models:
        known = model_names(config, store, state_dir)
        lines += [_line("model", n, known) for n in models if n not in known]
    datasets = list(datasets)
    if datasets:
        known = dataset_names(config, store)
        lines += [_line("dataset", n, known) for n in datasets if n.partition("@")[0] not in known]
    return lines


def _line(what: str, name: str, known: set[str]) -> str:
    listing = ", ".join(sorted(n for n in known if "@" not in n)) or "none yet"
    return f"no {what} is named {name!r} here now (known: {listing}); the key may use it once one is"
