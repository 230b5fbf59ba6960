"""The gateway's policy sections of ``lamina.yaml``: request and rate limits, costs and budgets, guards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from lamina.config._base import Strict as _Strict


class RequestLimitsConfig(_Strict):
    """What one request to the gateway may hold. A request over a limit is refused (413 for the body's
    bytes, 400 for the rest, naming the limit) before its body is parsed or any work is queued."""

    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="Bytes of a request body (declared by Content-Length, or counted as a chunked body "
        "arrives); a larger one is a 413, refused before it is read.",
    )
    max_messages: int = Field(1000, ge=1, description="Messages in one chat request.")
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Texts in one embedding request (OpenAI's limit is 2048)."
    )
    max_stop: int = Field(4, ge=1, description="Stop sequences in one request (OpenAI's limit is 4).")
    max_tokens: int = Field(
        32768, ge=1, description="The largest `max_tokens` / `max_completion_tokens` a request may ask for."
    )
    max_json_depth: int = Field(
        100,
        ge=8,
        le=500,
        description="How deep a body may nest JSON objects and arrays (8 to 500; a JSON Schema in "
        "`response_format` or `tools` nests the most).",
    )
    max_input_chars: int = Field(
        1_000_000,
        ge=1,
        description="Characters in one text: a message's content (or one of its text parts), a prompt, an "
        "embedding input, a retrieval query.",
    )


class ModelPriceConfig(_Strict):
    input_per_million: float = Field(ge=0, allow_inf_nan=False, description="USD per million input tokens.")
    output_per_million: float = Field(ge=0, allow_inf_nan=False, description="USD per million output tokens.")


class CostsConfig(_Strict):
    """What calls cost and how much may be spent (``lamina costs`` reads the ledger)."""

    cpu_core_hour_usd: float = Field(
        0.089,
        ge=0,
        allow_inf_nan=False,
        description="USD per hour of one CPU core (a llama.cpp thread). Default: AWS EC2 c7i.large on demand "
        "in us-east-1, $0.08925/h for 2 vCPUs, i.e. one physical core.",
    )
    gpu_hour_usd: dict[str, float] = Field(
        default_factory=dict,
        description="USD per hour of one GPU by model name as `nvidia-smi --query-gpu=name` prints it; a key "
        "matches a GPU whose name contains it (case-insensitive), e.g. `{H100: 2.5}`.",
    )
    models: dict[str, ModelPriceConfig] = Field(
        default_factory=dict,
        description="Token prices by public model name; these models are priced by tokens, not compute.",
    )
    tokens_per_second: dict[str, float] = Field(
        default_factory=dict,
        description="A conservative (low) tokens/s per deployment, to estimate a compute-priced call's cost "
        "when it is admitted; others use default_tokens_per_second.",
    )
    default_tokens_per_second: float = Field(
        20.0, gt=0, allow_inf_nan=False, description="The rate for deployments not in tokens_per_second."
    )
    budget_usd: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Spend allowed to all keys together per budget_period."
    )
    budget_period: Literal["day", "week", "month"] = Field("month", description="Budgets reset then (UTC).")
    soft_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Past this fraction of a budget, calls still pass but carry `x-lamina-budget-warning`.",
    )

    @model_validator(mode="after")
    def _finite_rates(self) -> CostsConfig:
        bad = {k: v for k, v in self.gpu_hour_usd.items() if not 0 <= v < float("inf")}
        bad |= {k: v for k, v in self.tokens_per_second.items() if not 0 < v < float("inf")}
        if bad:
            raise ValueError(f"gpu_hour_usd needs finite prices >= 0, tokens_per_second rates > 0: {bad}")
        return self


class ModelRateLimitsConfig(_Strict):
    rpm: int | None = Field(None, ge=1, description="Requests per minute to this model, all keys together.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute to this model, all keys together.")


class RateLimitsConfig(_Strict):
    """Requests and tokens per minute, per key, per model and for the whole gateway. Counters live in
    the process (``memory://``) or in Redis, which makes them exact across gateway processes sharing it."""

    storage_url: str = Field(
        "memory://",
        pattern=r"^(memory://$|rediss?://)",
        description="Where the counters live: `memory://` (this process) or `redis://host:port/db` "
        "(`rediss://` for TLS), shared by every gateway that should count together.",
    )
    key_rpm: int | None = Field(
        None, ge=1, description="Requests per minute of each key that has no `rpm` of its own."
    )
    key_tpm: int | None = Field(
        None, ge=1, description="Tokens per minute of each key that has no `tpm` of its own."
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute to the gateway, all keys together.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute to the gateway, all keys together.")
    per_model: dict[str, ModelRateLimitsConfig] = Field(
        default_factory=dict,
        description="Limits per model, by the name clients ask for (a deployment or a RAG alias).",
    )
    fail_open: bool = Field(
        False,
        description="When Redis cannot be reached: admit calls unlimited (true) or refuse them with a 503 "
        "(false).",
    )


class GuardConfig(_Strict):
    """One guardrail: what it looks for (``kind``), what it does when it finds it, and its options."""

    kind: Literal["pii", "injection", "toxicity", "topics", "length", "json_schema"] = Field(
        description="pii: emails, phones, cards, IBANs, IPs, SSNs, API keys; injection: prompt injection and "
        "jailbreaks; toxicity: profanity and slurs (bundled list); topics: your words and regexes; length "
        "and json_schema: the model's answer (output only)."
    )
    name: str | None = Field(None, description="Name in errors, spans and metrics. Empty: the kind.")
    action: Literal["block", "redact", "flag"] = Field(
        "block",
        description="On a finding: refuse (400 content_blocked; a stream ends with an error event), replace "
        "each finding with <ENTITY> (pii, toxicity, topics), or only record it.",
    )
    fail_open: bool = Field(
        False,
        description="When the guard fails or overruns timeout_ms: let the text through (true) or block.",
    )
    timeout_ms: float = Field(500.0, gt=0, description="Longest the guard may take on one text.")
    exempt_keys: list[str] = Field(
        default_factory=list, description="API key names or ids this guard does not apply to."
    )
    entities: list[str] | None = Field(None, description="pii: the entities to find. Empty: all of them.")
    threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="pii: lowest recognizer score (default 0.4); injection: classifier probability above "
        "which a text is an injection (default: the threshold shipped with the weights, set for 2% false "
        "positives on the training set's benign prompts).",
    )
    classifier: Literal["always", "suspicious", "never"] = Field(
        "suspicious",
        description="injection: run the embedding classifier on every text, only on texts with "
        "instruction-like words (heuristics always run), or never.",
    )
    words: list[str] = Field(
        default_factory=list,
        description="toxicity: words added to the bundled list; topics: the words and phrases to find (a "
        "trailing * matches word starts).",
    )
    patterns: list[str] = Field(default_factory=list, description="topics: regular expressions to find.")
    max_chars: int | None = Field(None, ge=1, description="length: most characters in an answer.")
    max_tokens: int | None = Field(
        None, ge=1, description="length: most tokens in an answer (estimated: one per 4 bytes of UTF-8)."
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="json_schema: the schema answers must satisfy. Empty: the request's "
        "response_format json_schema (requests without one are not checked).",
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> GuardConfig:
        if self.action == "redact" and self.kind in ("injection", "length", "json_schema"):
            raise ValueError(f"a {self.kind} guard cannot redact (action: {self.action}); use block or flag")
        if self.kind == "topics" and not (self.words or self.patterns):
            raise ValueError("a topics guard needs words or patterns to look for")
        if self.kind == "length" and self.max_chars is None and self.max_tokens is None:
            raise ValueError("a length guard needs max_chars or max_tokens")
        return self


class GuardsConfig(_Strict):
    """Guardrails on what goes into the models and what comes out, in the order given."""

    input: list[GuardConfig] = Field(
        default_factory=list,
        description="Checked on a request's messages, prompt or embedding inputs before it is dispatched.",
    )
    output: list[GuardConfig] = Field(
        default_factory=list,
        description="Checked on the model's answer (a stream as it flows, a JSON schema at its end).",
    )

    @model_validator(mode="after")
    def _placed(self) -> GuardsConfig:
        misplaced = [g.kind for g in self.input if g.kind in ("length", "json_schema")]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} guards check answers: list them under guards.output")
        return self


class SemanticCacheConfig(_Strict):
    """The semantic response cache: an earlier answer to a request that means the same (off by default)."""

    enabled: bool = Field(
        False,
        description="Also answer from the nearest earlier request by embedding of its last user message, "
        "within the same model, system prompt, template and dataset version (cache.ttl_s applies).",
    )
    min_similarity: float = Field(
        0.999,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Cosine similarity of the last user messages at or above which an earlier answer is "
        "served. At 0.999 the bundled MiniLM gives under 1% false hits on PAWS hard negatives (same words, "
        "another meaning) and catches few paraphrases; lower values catch more and serve wrong answers "
        "(README, Response cache; bench/semantic_cache.py).",
    )


class CacheConfig(_Strict):
    """The response cache: deterministic requests (temperature 0 or a seed), or any request that sends
    ``x-lamina-cache: use``, are answered from earlier identical ones."""

    enabled: bool = Field(
        False,
        description="Cache answers at all. Off by default: a cached answer skips the engine, which a user "
        "measuring or testing the engine must ask for.",
    )
    backend: Literal["memory", "store", "redis"] = Field(
        "memory",
        description="Where answers are kept: memory (this gateway process), store (the metadata store: "
        "the SQLite file, or PostgreSQL), or redis (shared by every gateway, at `url`).",
    )
    url: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="Redis URL for the redis backend: `redis://host:port/db` (`rediss://` for TLS).",
    )
    ttl_s: float = Field(3600.0, gt=0, allow_inf_nan=False, description="Seconds an answer is served.")
    max_entries: int = Field(10_000, ge=1, description="Answers kept; the least recently used go first.")
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Bytes of answers kept; the least recently used go first."
    )
    semantic: SemanticCacheConfig = Field(
        default_factory=SemanticCacheConfig, description="The semantic cache (off by default)."
    )

    @model_validator(mode="after")
    def _backend_url(self) -> CacheConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError(
                "cache.backend is redis but cache.url is empty; set cache.url: redis://HOST:PORT/DB"
            )
        return self


Strategy = Literal["least_busy", "lowest_latency", "lowest_cost", "weighted", "rules", "classifier"]


class GroupMemberConfig(_Strict):
    deployment: str = Field(description="A deployment (its `name` under `deployments`) serving this group.")
    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Its share of the traffic under the weighted strategy."
    )


class RoutingRuleConfig(_Strict):
    """One rule of the ``rules`` strategy: the first rule whose conditions all hold picks its member."""

    member: str = Field(description="The deployment (a member of the group) that serves matching requests.")
    min_prompt_chars: int | None = Field(
        None, ge=0, description="The request's text (messages or prompt) has at least this many characters."
    )
    max_prompt_chars: int | None = Field(
        None, ge=0, description="The request's text has at most this many characters."
    )
    has_tools: bool | None = Field(None, description="The request offers tools (true) or none (false).")
    response_format: Literal["text", "json_object", "json_schema"] | None = Field(
        None, description="The request's `response_format.type` is this one."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Each key has this value in the request's `metadata` object or, else, in its header "
        "`x-lamina-meta-KEY`.",
    )


class ModelGroupConfig(_Strict):
    """Several deployments behind one public model name, with a strategy to pick one per request and
    fallbacks to try when the pick fails (5xx, 429, no ready replica, timeout)."""

    name: str = Field(description="The model name clients ask for (must differ from every deployment's).")
    members: list[GroupMemberConfig] = Field(min_length=1, description="The deployments that serve it.")
    strategy: Strategy = Field(
        "least_busy",
        description="How a member is picked: fewest requests in flight from this gateway; lowest recent "
        "latency (an EWMA); lowest price per token (costs.models, else the compute price); at random by "
        "weight; the first matching rule (else the first member); a classifier of the request's text.",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Model names (deployments or other groups) tried in order when every try of this "
        "group failed.",
    )
    retries: int = Field(
        1, ge=0, le=10, description="Further members of this group tried after the first pick fails."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds one try may take before it counts as failed (streams: until the answer "
        "starts). Empty: no limit of its own.",
    )
    deadline_s: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds all tries of one request may take together, backoff included.",
    )
    rules: list[RoutingRuleConfig] = Field(
        default_factory=list, description="The `rules` strategy's rules, in order."
    )
    keywords: dict[str, list[str]] = Field(
        default_factory=dict,
        description="The `classifier` strategy's built-in classifier: words per member; the member whose "
        "words occur most in the request's text serves it (none: the first member).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelGroupConfig:
        names = [m.deployment for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"group {self.name!r} lists a member twice: {names}")
        strangers = sorted(({r.member for r in self.rules} | set(self.keywords)) - set(names))
        if strangers:
            raise ValueError(
                f"group {self.name!r}: rules or keywords name {strangers}, which are not its members {names}"
            )
        if self.strategy == "rules" and not self.rules:
            raise ValueError(f"group {self.name!r} has strategy rules but no rules; add `rules:`")
        if self.strategy == "classifier" and not self.keywords:
            raise ValueError(
                f"group {self.name!r} has strategy classifier but no `keywords` (or plug a classifier in)"
            )
        return self


def check_groups(
    groups: Sequence[ModelGroupConfig], deployments: Sequence[str], others: Sequence[str]
) -> None:
    """Raise ValueError unless every group's members are deployments, its name is new, and its
    fallbacks name known models without a cycle (``others``: RAG aliases, names that are not groups)."""
    names = [g.name for g in groups]
    taken = sorted((set(names) & (set(deployments) | set(others))) | {n for n in names if names.count(n) > 1})
    if taken:
        raise ValueError(f"group names must be unique and differ from deployments and RAG aliases: {taken}")
    for g in groups:
        missing = sorted({m.deployment for m in g.members} - set(deployments))
        if missing:
            raise ValueError(f"group {g.name!r}: members must be deployments; not deployed: {missing}")
        unknown = sorted(set(g.fallbacks) - set(deployments) - set(names))
        if unknown:
            raise ValueError(f"group {g.name!r}: fallbacks name unknown models {unknown}")
    edges = {g.name: [f for f in g.fallbacks if f in names] for g in groups}
    for start in edges:
        path, todo = [start], [(start, iter(edges[start]))]
        while todo:
            _node, rest = todo[-1]
            nxt = next(rest, None)
            if nxt is None:
                todo.pop()
                path.pop()
            elif nxt in path:
                cycle = " -> ".join([*path[path.index(nxt) :], nxt])
                raise ValueError(f"group fallbacks form a cycle: {cycle}; remove one of these fallbacks")
            else:
                path.append(nxt)
                todo.append((nxt, iter(edges[nxt])))
