"""``lamina keys``: API keys of the gateway: create, list, revoke, rotate.

Keys live in the metadata store of the state directory, so these commands work beside a running stack:
the gateway sees a revoked or rotated key within two seconds. A secret is printed once, when the key is
created or rotated; the store keeps only its hash.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    err_console,
    fail,
    out_console,
    print_json,
    print_table,
    state,
    state_store,
)
from lamina.clock import utcnow
from lamina.config import LaminaConfig
from lamina.errors import LaminaError
from lamina.stack import open_store, unknown_names

if TYPE_CHECKING:
    from lamina.application import KeyRecord, KeyStore

keys_app = typer.Typer(
    help="API keys of the gateway: create (the secret is shown once), list, revoke, rotate.",
    no_args_is_help=True,
)

RefArgument = Annotated[str, typer.Argument(help="The key's name or id (key_...).", show_default=False)]
_DURATION = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


class ScopeOption(StrEnum):
    admin = "admin"
    user = "user"


class PeriodOption(StrEnum):
    day = "day"
    week = "week"
    month = "month"


@contextmanager
def _keys(config: ConfigOption, state_dir: StateDirOption) -> Iterator[KeyStore]:
    """The keys of the state directory; a bad option exits 2, any other Lamina error 1, on one line."""
    from lamina.application import KeyStore  # the web stack: only for the commands that need it

    with state_store(config, state_dir) as store:
        yield KeyStore(store)


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _budget(value: str | None) -> tuple[float | None, PeriodOption | None]:
    if value is None:
        return None, None
    amount, _, period = value.partition("/")
    try:
        usd = float(amount.strip().removeprefix("$"))
        return usd, PeriodOption(period.strip().lower())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a budget; give USD/PERIOD with PERIOD day, week or month, e.g. 5/day"
        ) from None


def _expiry(value: str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    duration = _DURATION.match(value.strip().lower())
    if duration:
        return now + timedelta(**{_UNITS[duration[2]]: int(duration[1])})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (12h, 30d, 2w) nor an ISO date (2027-01-31 or "
            "2027-01-31T12:00:00+00:00)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _secret_shown(record: KeyRecord, secret: str, what: str, json_output: bool) -> None:
    if json_output:
        print_json({**record.to_json(utcnow()), "secret": secret})
        return
    out_console.print(
        f"{what} key [bold]{record.name}[/] ({record.id}, scope {record.scope})", highlight=False
    )
    out_console.print(secret, highlight=False, soft_wrap=True)
    err_console.print(
        "This secret is shown once: store it now. Clients send it as `Authorization: Bearer <secret>`."
    )


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", "-n", help="A unique name, e.g. team-search.")],
    scope: Annotated[
        ScopeOption, typer.Option(help="admin: everything, the admin API too; user: the OpenAI API.")
    ] = ScopeOption.user,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated model names the key may call (default: all).")
    ] = None,
    datasets: Annotated[
        str | None, typer.Option(help="Comma-separated datasets it may retrieve from (default: all).")
    ] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute (default: no limit).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute (default: no limit).")] = None,
    budget: Annotated[
        str | None, typer.Option(help="Spend allowed per period, USD/PERIOD: 5/day, 100/month.")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="When it stops working: 12h, 30d, 2w or an ISO date (default: never).")
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a key; its secret is printed once (with --json, as the field `secret`)."""
    from lamina.application import KeySpec, KeyStore

    usd, period = _budget(budget)
    expires_at = _expiry(expires, utcnow())
    spec = KeySpec(
        name=name,
        scope=scope.value,
        models=_names(models),
        datasets=_names(datasets),
        rpm=rpm,
        tpm=tpm,
        budget_usd=usd,
        budget_period=None if period is None else period.value,
        expires_at=expires_at,
    )
    with state(config, state_dir) as (cfg, root, store):
        record, secret = KeyStore(store).create(spec)
        unknown = unknown_names(cfg, store, root, spec.models or (), spec.datasets or ())
    _secret_shown(record, secret, "created", json_output)
    for line in unknown:  # a typo would otherwise show as a 403 on the key's first call
        err_console.print(f"warning: {line}", highlight=False, soft_wrap=True)


@keys_app.command("list")
def list_(
    json_output: JsonOption = False, state_dir: StateDirOption = None, config: ConfigOption = None
) -> None:
    """Every key with its scope, status and limits (never a secret: only its first characters)."""
    with _keys(config, state_dir) as keys:
        records = keys.list()
    now = utcnow()
    if json_output:
        print_json([r.to_json(now) for r in records])
        return
    if not records:
        out_console.print("no keys; create one with `lamina keys create --name NAME`")
        return
    table = Table("name", "id", "scope", "status", "secret", "models", "datasets", "limits", "expires")
    for r in records:
        table.add_row(*_row(r.to_json(now)))
    print_table(table)


def _row(key: dict[str, Any]) -> list[str]:
    limits = [f"{key[f]} {f}" for f in ("rpm", "tpm") if key[f] is not None]
    if key["budget_usd"] is not None:
        limits.append(f"${key['budget_usd']:g}/{key['budget_period']}")
    return [
        key["name"],
        key["id"],
        key["scope"],
        key["status"],
        f"{key['prefix']}…",
        "all" if key["models"] is None else ", ".join(key["models"]) or "none",
        "all" if key["datasets"] is None else ", ".join(key["datasets"]) or "none",
        ", ".join(limits) or "none",
        (key["expires_at"] or "never")[:16],
    ]


@keys_app.command("revoke")
def revoke(
    ref: RefArgument,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke a key for good; a running gateway refuses it within two seconds."""
    with _keys(config, state_dir) as keys:
        record = keys.revoke(ref)
    if json_output:
        print_json(record.to_json(utcnow()))
        return
    out_console.print(f"revoked key [bold]{record.name}[/] ({record.id})", highlight=False)


@keys_app.command("rotate")
def rotate(
    ref: RefArgument,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """A new secret for a key (same id, name and limits); the old secret stops working within two seconds."""
    with _keys(config, state_dir) as keys:
        record, secret = keys.rotate(ref)
    _secret_shown(record, secret, "rotated", json_output)


def _loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_open_bind(cfg: LaminaConfig, state_dir: Path, host: str, insecure_no_auth: bool) -> None:
    """Exit 2 unless the gateway can serve ``host``: loopback, or keys exist, or ``--insecure-no-auth``."""
    if insecure_no_auth or _loopback(host) or cfg.server.api_keys:
        return
    from lamina.application import KeyStore

    try:
        store = open_store(cfg, state_dir)
    except LaminaError as exc:
        fail(exc)
    try:
        exists = KeyStore(store).exists()
    except LaminaError as exc:
        fail(exc)
    finally:
        store.close()
    if not exists:
        fail(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use every model "
            "and the admin API. Create a key first (`lamina keys create --name admin --scope admin`, or set "
            "server.api_keys), or pass --insecure-no-auth to serve it open anyway",
            exit_code=2,
        )
