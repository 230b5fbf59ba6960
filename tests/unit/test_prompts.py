"""Prompt templates: versions in the store (new only when the content changed, never changed afterwards),
rendering in the sandbox (variables checked first, escapes and runaway templates are 400s), the compiled
cache, a request that names a template through the gateway, and the CLI."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event
from typer.testing import CliRunner

from lamina.application import Call, GatewayDeps, PromptSpec, PromptStore, create_app
from lamina.application._prompts import TRACE_CHARS, parse_ref, parse_templated
from lamina.application._templates import Renderer
from lamina.cli._app import app as cli
from lamina.config import RequestLimitsConfig
from lamina.errors import InvalidRequestError, LaminaError, NotFoundError
from lamina.models import ChatCompletionRequest
from lamina.observability import Telemetry, read_trace
from lamina.store import Store
from tests.support import CHAT, EMBED, FakeClock, ReplayDispatcher, StaticCatalog

SUPPORT = {
    "description": "first-line support",
    "messages": [
        {"role": "system", "content": "You support {{ customer }} with {{ product }}. Be {{ tone }}."},
        {"role": "user", "content": "My issues:\n{% for i in issues %}- {{ i }}\n{% endfor %}"},
    ],
    "variables": {
        "customer": {"type": "string", "maxLength": 40},
        "product": {"type": "string", "default": "Lamina"},
        "tone": {"enum": ["brief", "kind"], "default": "kind"},
        "issues": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
}
GOOD: dict[str, Any] = {"customer": "Ann", "issues": ["login fails"]}


def spec(**fields: Any) -> PromptSpec:
    return PromptSpec.model_validate(fields)


def message_of(exc: pytest.ExceptionInfo[LaminaError]) -> str:
    return exc.value.message


# --- the store --------------------------------------------------------------------------------------------


def test_a_version_is_added_only_when_the_content_changes_and_never_changes(store: Store) -> None:
    prompts = PromptStore(store, clock=FakeClock())
    v1, created = prompts.add("support", spec(**SUPPORT))
    assert (v1.ref, created, v1.kind, v1.required()) == ("support@1", True, "chat", ["customer", "issues"])
    again, created = prompts.add("support", spec(**{**SUPPORT, "description": "reworded"}))
    assert (again, created) == (v1, False)  # the description is not content
    changed = {**SUPPORT, "messages": [*SUPPORT["messages"], {"role": "assistant", "content": "On it."}]}
    v2, created = prompts.add("support", spec(**changed))
    assert (v2.version, created) and v2.sha256 != v1.sha256
    assert prompts.get("support@1") == v1  # the old version is as it was
    assert prompts.get("support") == prompts.get("support@latest") == v2
    back, created = prompts.add("support", spec(**SUPPORT))  # a revert is a new version, the newest
    assert (back.version, created, back.sha256) == (3, True, v1.sha256)
    prompts.add("haiku", spec(prompt="A haiku about {{ topic }}:"))
    assert [(v.ref, n) for v, n in prompts.list()] == [("haiku@1", 1), ("support@3", 3)]
    assert [v.version for v in prompts.versions("support")] == [1, 2, 3]
    with pytest.raises(NotFoundError, match=r"no prompt template named 'nope'.*lamina prompts add nope"):
        prompts.get("nope")
    with pytest.raises(NotFoundError, match=r"'support' has no version 9 \(its versions are 1 to 3\)"):
        prompts.get("support@9")


def test_adds_racing_on_one_name_all_get_their_own_version(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    barrier = threading.Barrier(6)

    def add(i: int) -> int:
        prompts = PromptStore(store)
        barrier.wait(timeout=30)
        return prompts.add("race", spec(prompt=f"text {i}"))[0].version

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(add, range(6))) == [1, 2, 3, 4, 5, 6]
    store.close()


@pytest.mark.parametrize(
    ("ref", "problem"),
    [("Support", "does not name a template"), ("support@two", "a version is a number"), ("a@0", "from 1")],
)
def test_a_bad_reference_says_how_to_write_one(ref: str, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        parse_ref(ref)


@pytest.mark.parametrize(
    ("fields", "param", "problem"),
    [
        ({"messages": [{"role": "user", "content": "{% for x in y %}"}]}, "messages[0].content", "line 1"),
        ({"prompt": "{{ a }} {{ b }}", "variables": {"a": {}}}, "variables", "uses b, which"),
        ({"prompt": "{{ a }}", "variables": {"a": {"type": "text"}}}, "variables.a", "invalid JSON schema"),
        (
            {"prompt": "{{ a }}", "variables": {"a": {"type": "integer", "default": "x"}}},
            "variables.a",
            "default",
        ),
    ],
)
def test_a_template_that_cannot_work_is_refused_when_added(
    tmp_path: Path, fields: dict[str, Any], param: str, problem: str
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    with pytest.raises(InvalidRequestError, match=problem) as exc:
        PromptStore(store).add("broken", spec(**fields))
    assert exc.value.param == param
    store.close()


def test_the_spec_says_what_it_needs() -> None:
    with pytest.raises(ValueError, match="either `messages`"):
        spec(prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ValueError, match="cannot name a variable"):
        spec(prompt="{{ loop }}", variables={"loop": {}})
    with pytest.raises(ValueError, match="role"):
        spec(messages=[{"role": "wizard", "content": "y"}])


# --- rendering --------------------------------------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path: Path) -> Iterator[PromptStore]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    yield PromptStore(store)
    store.close()


def test_variables_are_checked_then_the_template_is_rendered_with_defaults(prompts: PromptStore) -> None:
    prompts.add("support", spec(**SUPPORT))
    rendered = prompts.render("support", {**GOOD, "tone": "brief"})
    assert rendered.ref == "support@1" and rendered.prompt is None
    assert rendered.messages == [
        {"role": "system", "content": "You support Ann with Lamina. Be brief."},
        {"role": "user", "content": "My issues:\n- login fails\n"},
    ]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"issues": []}, "needs the variables customer (string)", "customer"),
        ({**GOOD, "urgent": True}, "has no variable 'urgent'; it takes: customer (string)", "urgent"),
        (
            {**GOOD, "customer": 7},
            "'customer' of the template support@1 is invalid: 7 is not of type",
            "customer",
        ),
        ({**GOOD, "tone": "rude"}, "'rude' is not one of", "tone"),
        ({**GOOD, "issues": ["a", "b", "c", "d"]}, "is too long", "issues"),
    ]
    for variables, problem, name in cases:
        with pytest.raises(InvalidRequestError, match=re.escape(problem)) as exc:
            prompts.render("support@1", variables)
        assert exc.value.param == f"lamina_template.variables.{name}" and exc.value.status == 400


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'].system('true') }}",
        "{{ items.append(1) }}{{ items }}",
        "{{ namespace.__init__ }}",
        "{{ items.pop() }}",
    ],
)
def test_a_sandbox_escape_is_a_400_and_nothing_leaks(prompts: PromptStore, source: str) -> None:
    prompts.add("evil", spec(prompt=source))
    with pytest.raises(InvalidRequestError, match="tried what its sandbox forbids") as exc:
        prompts.render("evil", {"items": [1]} if "items" in source else {})
    assert exc.value.status == 400 and "<" not in exc.value.message  # no object's repr comes back


@pytest.mark.parametrize(
    ("source", "tick", "problem"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            0.04,
            "deadline",
        ),
        ("{% for i in range(100000) %}{{ i }}{% endfor %}", 0.0, "more than its size bound"),
        ("{{ 'x' * 1000000000 }}", 0.0, "repeat 1 items 1000000000 times"),
        ("{{ 7 ** 1000000 }}", 0.0, "too large a number"),
        ("{{ 1 / 0 }}", 0.0, "ZeroDivisionError"),
        ("{{ nothing.here }}", 0.0, "UndefinedError"),
    ],
)
def test_a_runaway_or_failing_render_is_a_400(tmp_path: Path, source: str, tick: float, problem: str) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    clock = FakeClock(tick=tick)  # every deadline check reads it: with 40 ms a read, the third passes 0.1 s
    renderer = Renderer(max_render_s=0.1, max_output_chars=10_000, monotonic=clock.monotonic)
    prompts = PromptStore(store, renderer=renderer)
    prompts.add("runaway", spec(prompt=source, variables={"nothing": {"default": {}}}))
    with pytest.raises(InvalidRequestError, match=problem):
        prompts.render("runaway", {})
    store.close()


@pytest.mark.anyio
async def test_compiled_templates_are_cached_and_latest_is_looked_up_again_after_the_ttl(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    clock = FakeClock()
    prompts = PromptStore(store, ttl_s=2.0, monotonic=clock.monotonic)
    prompts.add("support", spec(**SUPPORT))
    queries: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    first = await prompts.render_async("support@1", GOOD)
    compiled = prompts.renderer.cached("support", 1)
    assert compiled is not None and len(queries) == 1
    assert await prompts.render_async("support@1", GOOD) == first and len(queries) == 1
    assert prompts.renderer.cached("support", 1) is compiled  # compiled once
    await prompts.render_async("support", GOOD)  # which version `support` means: asked once
    await prompts.render_async("support", GOOD)
    assert len(queries) == 2
    prompts.add("support", spec(prompt="Help {{ customer }}."))
    assert (await prompts.render_async("support", GOOD)).version == 1  # within the TTL
    clock.advance(2.0)
    assert (await prompts.render_async("support", {"customer": "Bo"})).prompt == "Help Bo."
    store.close()


@pytest.mark.anyio
async def test_the_rendered_text_is_an_event_on_the_request_span(prompts: PromptStore) -> None:
    prompts.add("long", spec(prompt="{{ text }}"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    raw = json.dumps(
        {"model": CHAT, "lamina_template": {"name": "long", "variables": {"text": "é" * 5000}}}
    ).encode()
    with provider.get_tracer("test").start_as_current_span("request") as span:
        body, parsed, ref = await parse_templated(
            raw, ChatCompletionRequest, RequestLimitsConfig(), prompts, span
        )
    assert ref == "long@1" and "lamina_template" not in body
    assert isinstance(parsed, ChatCompletionRequest) and parsed.messages[0].role == "user"
    [finished] = exporter.get_finished_spans()
    attributes = dict(finished.attributes or {})
    assert attributes["lamina.template.name"] == "long" and attributes["lamina.template.version"] == 1
    [rendered] = [dict(e.attributes or {}) for e in finished.events]
    assert rendered["lamina.template.chars"] == 5000
    assert rendered["lamina.template.text"] == "é" * TRACE_CHARS


# --- through the gateway ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """A policy that keeps the calls it admits."""

    calls: list[Call] = field(default_factory=list)

    async def admit(self, call: Call) -> None:
        self.calls.append(call)


@dataclass
class Gw:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    store: Store
    telemetry: Telemetry
    seen: Seen


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    prompts = PromptStore(store, ttl_s=0.0)
    prompts.add("support", spec(**SUPPORT))
    prompts.add("haiku", spec(prompt="A haiku about {{ topic }}:"))
    telemetry = Telemetry(service_name="prompts-test", store=store)
    dispatcher, seen = ReplayDispatcher(), Seen()
    limits = RequestLimitsConfig(max_input_chars=1000)
    deps = GatewayDeps(
        StaticCatalog(), dispatcher, lambda: {}, telemetry, policies=[seen], prompts=prompts, limits=limits
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Gw(client, dispatcher, store, telemetry, seen)
    telemetry.shutdown()
    store.close()


@pytest.mark.anyio
async def test_the_replica_gets_the_rendered_messages_before_the_clients(gw: Gw) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "And billing too."}],
        "lamina_template": {"name": "support@1", "variables": GOOD},
    }
    r = await gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    [sent] = gw.dispatcher.sent
    assert sent.body["messages"] == [
        {"role": "system", "content": "You support Ann with Lamina. Be kind."},
        {"role": "user", "content": "My issues:\n- login fails\n"},
        {"role": "user", "content": "And billing too."},
    ]
    assert not {k for k in sent.body if k.startswith("lamina")}  # neither the field nor the version
    assert gw.seen.calls[0].template == "support@1"
    gw.telemetry.force_flush()
    [root] = [s for s in read_trace(gw.store, r.headers["x-lamina-trace-id"]) if s["parent_span_id"] is None]
    assert (root["attributes"]["lamina.template.name"], root["attributes"]["lamina.template.version"]) == (
        "support",
        1,
    )


@pytest.mark.anyio
async def test_a_prompt_template_fills_a_completion_and_a_chat_without_messages(gw: Gw) -> None:
    wanted = {"name": "haiku", "variables": {"topic": "rain"}}
    r = await gw.client.post("/v1/completions", json={"model": CHAT, "lamina_template": wanted})
    assert r.status_code == 200, r.text
    assert gw.dispatcher.sent[0].body["prompt"] == "A haiku about rain:"
    r = await gw.client.post("/v1/chat/completions", json={"model": CHAT, "lamina_template": wanted})
    assert r.status_code == 200, r.text
    assert gw.dispatcher.sent[1].body["messages"] == [{"role": "user", "content": "A haiku about rain:"}]
    assert [c.template for c in gw.seen.calls] == ["haiku@1", "haiku@1"]
    r = await gw.client.post(
        "/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200 and gw.seen.calls[-1].template is None


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "problem"),
    [
        (
            "/v1/chat/completions",
            {"lamina_template": {"name": "nope@2"}},
            404,
            "lamina_template.name",
            "'nope'",
        ),
        (
            "/v1/chat/completions",
            {"lamina_template": {"name": "support"}},
            400,
            "lamina_template.variables.customer",
            "needs",
        ),
        (
            "/v1/chat/completions",
            {"lamina_template": {"name": "haiku", "vars": {}}},
            400,
            "lamina_template.vars",
            "vars",
        ),
        (
            "/v1/completions",
            {"lamina_template": {"name": "support", "variables": GOOD}},
            400,
            "lamina_template.name",
            "holds chat messages",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "lamina_template": {"name": "haiku", "variables": {"topic": "x"}}},
            400,
            "prompt",
            "not both",
        ),
        (
            "/v1/embeddings",
            {"model": EMBED, "input": "x", "lamina_template": {"name": "haiku"}},
            400,
            "lamina_template",
            "only",
        ),
    ],
)
@pytest.mark.anyio
async def test_a_template_that_cannot_be_used_is_refused_before_dispatch(
    gw: Gw, path: str, body: dict[str, Any], status: int, param: str, problem: str
) -> None:
    r = await gw.client.post(path, json={"model": CHAT, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and problem in error["message"]
    assert gw.dispatcher.sent == [] and gw.seen.calls == []


@pytest.mark.anyio
async def test_a_sandbox_violation_through_the_gateway_is_a_400(gw: Gw) -> None:
    PromptStore(gw.store).add("evil", spec(prompt="{{ ''.__class__.__mro__ }}"))
    r = await gw.client.post("/v1/completions", json={"model": CHAT, "lamina_template": {"name": "evil"}})
    assert r.status_code == 400 and "sandbox forbids" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_rendered_request_meets_the_request_limits(gw: Gw) -> None:
    wanted = {"name": "haiku", "variables": {"topic": "x" * 1000}}  # the prompt: 1016 characters
    r = await gw.client.post("/v1/completions", json={"model": CHAT, "lamina_template": wanted})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


# --- the CLI ----------------------------------------------------------------------------------------------


def test_the_cli_adds_lists_shows_and_renders(tmp_path: Path) -> None:
    runner = CliRunner()
    sd = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(cli, ["prompts", *args, *sd])
        assert result.exit_code == code, result.output
        return json.loads(result.stdout) if "--json" in args and code == 0 else result.output

    file = tmp_path / "support.yaml"
    file.write_text(
        "description: first-line support\n"
        "variables:\n  customer: {type: string}\n  n: {type: integer, default: 1}\n"
        "messages:\n  - role: system\n    content: |\n      Help {{ customer }} ({{ n }}).\n"
    )
    added = run("add", "support", "--file", str(file), "--json")
    assert (added["ref"], added["created"], added["required"]) == ("support@1", True, ["customer"])
    assert run("add", "support", "--file", str(file), "--json")["created"] is False
    messages = json.dumps([{"role": "user", "content": "Hi {{ who }}"}])
    assert "added support@2" in run("add", "support", "--messages", messages, "--description", "short")
    [listed] = run("list", "--json")
    assert (listed["ref"], listed["versions"], listed["variables"]) == ("support@2", 2, {"who": {}})
    shown = run("show", "support@1", "--json")
    assert shown["messages"][0]["content"] == "Help {{ customer }} ({{ n }}).\n" and shown["versions"] == [
        1,
        2,
    ]
    rendered = run("render", "support@1", "--var", "customer=5", "--var", "n=3", "--json")
    assert rendered["messages"] == [{"role": "system", "content": "Help 5 (3)."}]
    assert "Help Ann (1)." in run("render", "support@1", "--var", "customer=Ann")
    assert "needs the variables customer" in run("render", "support@1", code=2)
    assert "no prompt template named 'nope'" in run("show", "nope", code=1)
    run("add", "bad", "--messages", '[{"role": "user", "content": "{% if %}"}]', code=2)
    run("add", "bad", code=2)


def test_the_readme_example_adds_and_renders(prompts: PromptStore) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Prompt templates", 1)[1]
    template = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    version, _ = prompts.add("support", spec(**template))
    curl = section.split("```sh\ncurl", 1)[1].split("```", 1)[0]
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body["lamina_template"]["name"] == version.ref
    rendered = prompts.render(version.ref, body["lamina_template"]["variables"])
    assert rendered.messages == [
        {"role": "system", "content": "You support Ann. Be kind."},
        {"role": "user", "content": "My issues:\n- login fails\n"},
    ]
