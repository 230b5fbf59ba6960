"""The metadata tables of the orchestration layer's state: run-time deployments, the rollouts of the
config's deployments, the rollouts in progress, and the job queue. Their shape changes only by a
migration under ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
)

from lamina.store._columns import UTCDateTime
from lamina.store._schema import metadata

# -- run-time deployments (migration 0008), rollouts of config deployments (migration 0014) ---------------

#: deployments made at run time through the admin API (``lamina deploy``); the config's own deployments are
#: not stored here. The stack restores these at start.
deployments = Table(
    "deployments",
    metadata,
    Column("name", String(200), primary_key=True, comment="the public model name clients ask for"),
    Column("model", String(300), nullable=False, comment="registry reference NAME[@VERSION|@ALIAS]"),
    Column("engine", String(100), nullable=True, comment="null: the engine of the registered file's format"),
    Column("options", JSON, nullable=False, comment="engine options by engine name"),
    Column("min_replicas", Integer, nullable=False),
    Column("max_replicas", Integer, nullable=False),
    Column("target_concurrency", Float, nullable=False, comment="in-flight requests per replica to aim at"),
    Column("scale_to_zero", Boolean, nullable=False),
    Column("autoscale", JSON, nullable=False, comment="the autoscaler's delays and window, seconds"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: a config deployment moved to another model version by a rollout (the config file is its record, so the
#: rollout is kept beside it): applied at start while the config still names ``config_model``
config_rollouts = Table(
    "config_rollouts",
    metadata,
    Column("name", String(200), primary_key=True, comment="the config deployment"),
    Column("config_model", String(300), nullable=False, comment="the model the config named at the rollout"),
    Column("model", String(300), nullable=False, comment="the version it rolled to, NAME@VERSION"),
    Column("options", JSON, nullable=False, comment="engine options by engine name, as rolled out"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: a rollout not finished yet (migration 0015): begun again after a restart (``stack/_rollouts_pending.py``)
rollouts_in_progress = Table(
    "rollouts_in_progress",
    metadata,
    Column("name", String(200), primary_key=True, comment="the deployment rolling out"),
    Column("model", String(300), nullable=False, comment="the target as asked, NAME@VERSION"),
    Column("strategy", String(20), nullable=False, comment="rolling, or canary (a promoted canary: rolling)"),
    Column("weight", Integer, nullable=False, comment="the canary's share of the requests, %"),
    Column("policy", JSON, nullable=True, comment="the automatic rollback's settings; null: none"),
    Column("options", JSON, nullable=True, comment="engine options asked; null: the deployment's"),
    Column("config_model", String(300), nullable=True, comment="a config deployment's model at the start"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# -- job queue (migration 0009) -----------------------------------------------------------------------------

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True, comment="job_ + 12 hex characters"),
    Column("kind", String(100), nullable=False, comment="a registered job kind: embed, eval, quantize, ..."),
    Column("args", JSON, nullable=False, comment="the kind's arguments, {name: value}"),
    Column(
        "state", String(12), nullable=False, comment="queued running succeeded failed cancelled preempted"
    ),
    Column("priority", Integer, nullable=False, comment="higher runs first and may preempt lower"),
    Column("cpus", Float, nullable=False, comment="CPU cores requested"),
    Column("memory_bytes", BigInteger, nullable=False, comment="memory requested"),
    Column("gpus", Integer, nullable=False, comment="whole GPUs requested"),
    Column("gpu_milli", Integer, nullable=False, comment="a share of one GPU in thousandths; 0: none"),
    Column("attempts", Integer, nullable=False, comment="runs that ended in failure or are running"),
    Column("max_attempts", Integer, nullable=False),
    Column("preemptions", Integer, nullable=False, comment="runs stopped to free resources (not failures)"),
    Column("progress", Float, nullable=False, comment="0..1, as the job process last reported"),
    Column("message", Text, nullable=False, comment="the job process's last progress message"),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("log_path", Text, nullable=True),
    Column("pid", Integer, nullable=True, comment="the running attempt's process"),
    Column("cancel_requested", Boolean, nullable=False),
    Column("inputs", JSON, nullable=False, comment="lineage: dataset/model versions the job read"),
    Column("outputs", JSON, nullable=False, comment="lineage: dataset/model versions the job produced"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("not_before", UTCDateTime(), nullable=True, comment="a retry waits until then (backoff)"),
    Index("ix_jobs_state_priority", "state", "priority"),
)
