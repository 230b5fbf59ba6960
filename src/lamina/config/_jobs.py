"""The ``jobs`` section: the job queue that shares this machine's devices with the serving replicas."""

from __future__ import annotations

from pydantic import Field, model_validator

from lamina.config._base import Strict


class JobsConfig(Strict):
    enabled: bool = Field(True, description="Run the job scheduler in the gateway (`lamina up`).")
    cpus: float | None = Field(
        None,
        ge=0,
        description="CPU cores that serving replicas and jobs share; a job starts when its request fits in "
        "what the replicas and running jobs leave. Empty: the cores this process may use.",
    )
    memory_bytes: int | None = Field(
        None, ge=0, description="Memory that serving replicas and jobs share. Empty: the machine's memory."
    )
    gpus: int | None = Field(
        None, ge=0, description="GPUs that serving replicas and jobs share. Empty: every NVIDIA GPU found."
    )
    kinds: dict[str, str] = Field(
        default_factory=dict,
        description="Job kinds of your own: name to `module:function`; the function is called in the job's "
        "process with the job's arguments and a JobContext, and returns a JSON object.",
    )
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description="How much lower the OS priority (nice) of a job's processes is than the gateway's and "
        "the replicas': a busy replica gets the CPU first, so jobs use the cores the replicas leave idle "
        "instead of counting their CPUs as taken. 0: the same priority; the replicas' CPUs are then held "
        "for them, and jobs are preempted when serving grows into them.",
    )
    interval_s: float = Field(1.0, gt=0, description="Seconds between two looks at the queue.")
    retry_backoff_s: float = Field(5.0, ge=0, description="Delay before a failed job's first retry.")
    retry_backoff_max_s: float = Field(300.0, ge=0, description="Longest delay between retries.")
    stop_grace_s: float = Field(
        10.0, ge=0, description="Seconds a cancelled or preempted job has after SIGTERM before SIGKILL."
    )

    @model_validator(mode="after")
    def _backoff(self) -> JobsConfig:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_backoff_max_s ({self.retry_backoff_max_s}) must be at least retry_backoff_s "
                f"({self.retry_backoff_s})"
            )
        return self
