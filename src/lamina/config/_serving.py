"""The config sections of serving: deployments and their replicas, orchestration timings, observability."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from lamina.config._base import Strict as _Strict

#: Seconds an engine step may run without progress before a replica reports itself stuck.
DEFAULT_WATCHDOG_S = 60.0


class BatchingConfig(_Strict):
    """How a replica gathers concurrent requests: embeddings into one engine call (micro-batching), and
    the prompts of requests sent together into one prefill (a batching generation engine)."""

    window_ms: float = Field(
        1.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="Milliseconds (0 to 1000) an open batch waits for more requests while the engine is idle "
        "(0: it goes at once). While the engine is busy, requests gather anyway, so only an idle replica's "
        "lone request pays the window.",
    )
    max_texts: int = Field(
        32,
        ge=1,
        description="Texts per engine call; a request that would overflow the open batch starts the next "
        "one (a larger request alone is one batch).",
    )
    gather_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="Generation on a batching engine: when a request reaches an idle replica, its prompt "
        "waits until no other request has arrived for this many milliseconds (4 times as long at most), "
        "so that requests sent together are prefilled together instead of one first and the rest a whole "
        "prefill later (0: at once). A busy replica never waits: newcomers join its next step.",
    )


class AutoscaleConfig(_Strict):
    """Replicas that follow traffic: requests in flight per replica, averaged, between the two limits."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 scales to zero when idle.")
    max_replicas: int = Field(ge=1, description="Most replicas (the will-it-fit check should allow them).")
    target_concurrency: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        description="Requests in flight per replica (running or queued) to aim at.",
    )
    window_s: float = Field(10.0, ge=0, allow_inf_nan=False, description="Seconds the load is averaged over.")
    upscale_delay_s: float = Field(
        5.0, ge=0, allow_inf_nan=False, description="Seconds more replicas must be wanted before they start."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, allow_inf_nan=False, description="Seconds fewer must be wanted before replicas stop."
    )
    idle_delay_s: float = Field(
        300.0,
        ge=0,
        allow_inf_nan=False,
        description="With min_replicas 0: idle seconds before scaling to zero.",
    )
    cold_start_budget_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="With min_replicas 0: how long a request waits for a replica.",
    )

    @model_validator(mode="after")
    def _limits(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentConfig(_Strict):
    name: str = Field(description="The model name clients ask for (OpenAI `model` field).")
    model: str | None = Field(
        None,
        description="Registry reference NAME, NAME@VERSION or NAME@ALIAS. Empty: same as `name`. "
        "Not used by engines that take no model file (the fake engine).",
    )
    engine: str | None = Field(
        None,
        description="Engine plugin to run it with (`lamina engines` lists those installed: gguf, onnx, "
        "fake, and any plugin's). Empty: the engine that loads the registered file's format.",
    )
    replicas: int = Field(
        1, ge=0, description="Replica worker processes to keep running (with `autoscale`: to start with)."
    )
    autoscale: AutoscaleConfig | None = Field(
        None, description="Scale the replicas on traffic between min_replicas and max_replicas (README)."
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig,
        description="How each replica gathers concurrent requests: embeddings into one engine call, the "
        "prompts of generation requests sent together into one prefill.",
    )
    watchdog_s: float = Field(
        DEFAULT_WATCHDOG_S,
        ge=1,
        allow_inf_nan=False,
        description="Seconds an engine step may run without progress before the replica's /health answers "
        "503 (stuck), so that the controller replaces it. Keep it above the longest single step (a long "
        "prompt's prefill on this hardware).",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Engine options by engine name, e.g. `{gguf: {n_ctx: 4096}}`; checked against the "
        "engine's own options when the config is loaded (`lamina engines` lists them). A block may also "
        "be written under the engine's name beside the other fields (`gguf: {n_ctx: 4096}`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_blocks(cls, data: Any) -> Any:
        """Fold ``gguf: {...}``-style blocks (a mapping under a name that is not a field) into ``options``."""
        if not isinstance(data, dict):
            return data
        blocks = {
            key: value.model_dump() if isinstance(value, BaseModel) else value
            for key, value in data.items()
            if key not in cls.model_fields and isinstance(value, dict | BaseModel)
        }
        if not blocks:
            return data
        rest = {key: value for key, value in data.items() if key not in blocks}
        return rest | {"options": {**blocks, **dict(rest.get("options") or {})}}

    @field_validator("options", mode="before")
    @classmethod
    def _grouped(cls, value: Any) -> Any:
        return engine_blocks(value)

    @property
    def model_ref(self) -> str:
        return self.model or self.name

    def options_for(self, engine: str) -> dict[str, Any]:
        """This deployment's options block for ``engine`` (empty: the engine's defaults)."""
        return dict(self.options.get(engine, {}))


def engine_blocks(value: Any) -> Any:
    """``options`` as given, once each entry is an engine's block; an option written at the top
    (``{n_ctx: 4096}``) is a ValueError that shows it under an engine, not pydantic's "a valid dictionary"."""
    if isinstance(value, dict):
        loose = [key for key, block in value.items() if not isinstance(block, dict | BaseModel)]
        if loose:
            key = loose[0]
            raise ValueError(
                f'options are grouped by engine: {{"gguf": {{"{key}": {json.dumps(value[key])}}}}}, '
                f'not {{"{key}": ...}} at the top (`lamina engines` lists each engine\'s options)'
            )
    return value


class OrchestrationConfig(_Strict):
    backend: Literal["local", "ray"] = Field(
        "local",
        description="Where replicas run: local processes, or Ray actors on a Ray cluster (`pip install "
        "'lamina[ray]'`; nodes join with `ray start --address HEAD:6379`).",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray cluster to use with backend ray: `auto` (the one `ray start` runs here), or "
        "`ray://HOST:10001`. Empty: start a local Ray for this gateway, its files under the state directory.",
    )
    ready_timeout_s: float = Field(
        120.0, gt=0, description="How long a new replica may take to become ready."
    )
    health_interval_s: float = Field(1.0, gt=0, description="Seconds between replica health checks.")
    unhealthy_checks: int = Field(
        3,
        ge=1,
        description="A ready replica leaves rotation at its first failed health check (any answer but 200, "
        "or none in time) and is stopped and replaced after this many failed in a row (a stuck engine).",
    )
    restart_backoff_s: float = Field(0.5, ge=0, description="First delay before restarting a dead replica.")
    restart_backoff_max_s: float = Field(30.0, ge=0, description="Longest delay between restarts.")
    retry_deadline_s: float = Field(
        60.0, gt=0, description="How long a non-streaming request may wait and retry for a live replica."
    )
    drain_grace_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="A replica scaled away or undeployed leaves rotation at once and is stopped when its "
        "last in-flight request ends, or after this many seconds.",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> OrchestrationConfig:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(
                f"restart_backoff_max_s ({self.restart_backoff_max_s}) must be at least "
                f"restart_backoff_s ({self.restart_backoff_s})"
            )
        return self


class ObservabilityConfig(_Strict):
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces. Empty: none."
    )
    service_name: str = Field("lamina", description="OpenTelemetry service.name of the gateway.")
    store_spans: bool = Field(
        True, description="Keep the spans of sampled traces (see sample_rate) in the metadata store."
    )
    tracing: bool = Field(
        True,
        description="Record spans at all. Off: no spans, no x-lamina-layers breakdown, nothing stored or "
        "exported (metrics stay on).",
    )
    metrics: bool = Field(
        True,
        description="Count requests in the Prometheus metrics of /metrics. Off: the request path counts "
        "nothing (the series stay, empty; device and drift gauges are still sampled). For overhead "
        "measurements; the dashboard and `lamina top` read these series.",
    )
    sample_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction (0 to 1) of ordinary traces kept, decided when a request ends; errors and slow "
        "requests are always kept. Kept traces are also capped by sampled_per_s.",
    )
    sampled_per_s: float = Field(
        2.0,
        ge=0,
        description="At most this many ordinary (not error, not slow) traces kept per second on average "
        "(bursts of up to 10x pass): a few a second at light load, a small share under sustained load. "
        "0: none (errors and slow ones only).",
    )
    slow_ms: float = Field(
        5000.0, gt=0, description="A request taking longer (ms, whole stream) is slow: always kept."
    )
    retention_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="Stored traces older than this (seconds) are deleted."
    )
    retention_max_traces: int = Field(
        50_000, ge=1, description="At most this many traces stored; the oldest go first."
    )
    retention_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="At most this many bytes for the trace tables and their indexes, as the database "
        "measures them (SQLite dbstat, PostgreSQL pg_total_relation_size); from 85% of it the oldest "
        "traces go first, down to 70%.",
    )
    retention_interval_s: float = Field(
        30.0, gt=0, description="Seconds between two runs of the background retention."
    )
    keep_requests: bool = Field(
        False,
        description="Keep each traced request's body (after templates) and versions, for `lamina replay`.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="The gateway's and its replicas' log lines on stderr: text, or json (one object per "
        "line, with the trace_id of the request it was written for, for a log shipper).",
    )
    access_log: bool = Field(
        False,
        description="A log line (logger lamina.access) for each request to the API (/v1, /admin/v1): method, "
        "path, status, milliseconds, model, bottleneck layer and trace id.",
    )
