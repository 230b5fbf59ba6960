"""The options of the ``openai`` engine: a remote OpenAI-compatible API served as a deployment.

Kept apart from the engine (``_remote``) so that listing engines imports no HTTP client. The API key never
appears in the config: ``api_key_env`` names the environment variable that holds it, read by the replica
when it starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lamina.models._engine import Capability
from lamina.orchestration import Resources

#: what the upstream may be asked for; it refuses what its model cannot do
OPENAI_CAPABILITIES = frozenset(
    {
        Capability.CHAT,
        Capability.COMPLETION,
        Capability.EMBEDDING,
        Capability.STREAMING,
        Capability.LOGPROBS,
        Capability.PENALTIES,
        Capability.PASSTHROUGH,
    }
)

#: the ``Authorization`` header is made from ``api_key_env``; the rest are the client's to set
_RESERVED_HEADERS = frozenset({"authorization", "content-type", "content-length", "host"})


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        pattern=r"^https?://\S+$",
        description="The upstream's API root, up to and including its version, e.g. "
        "https://api.openai.com/v1, or a vLLM, llama-server or Ollama server's http://HOST:PORT/v1.",
    )
    model: str = Field(min_length=1, description="The upstream's name for the model (its `model` field).")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The NAME of the environment variable holding the upstream's API key (never the key "
        "itself), sent as `Authorization: Bearer`. Empty: no key is sent (a local server).",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to wait for the upstream to connect, and for each part of its answer; past "
        "it the request fails with 504.",
    )
    max_concurrency: int = Field(
        64, ge=1, le=4096, description="Requests in flight to the upstream at once; more wait their turn."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers sent with every request (e.g. `OpenAI-Organization`). Not for "
        "secrets: they are written in the config.",
    )

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = sorted(name for name in v if name.lower() in _RESERVED_HEADERS)
        if reserved:
            raise ValueError(
                f"the header(s) {', '.join(reserved)} are set by Lamina; leave them out (the key goes in "
                "the variable named by `api_key_env`)"
            )
        return v


def remote_resources(_files: Any, _options: Any) -> Resources:
    """No model file, no cores to speak of, a Python process's memory."""
    return Resources(cpus=0.1, memory_mb=128, gpus=0)
