"""Discord's own published contracts, as checks on everything that crosses tests/fake_discord.py.

REST: each request the bot sends and each answer the fake gives is validated against Discord's
official OpenAPI 3.1 document (tests/contracts/discord/openapi.json) with openapi-core: path,
method, query, headers' security and body, with unknown fields refused. Gateway: each payload the
fake sends and each the client sends is validated against JSON Schemas generated from the
`discord-api-types` package (tests/contracts/discord/gateway/). Provenance and refresh:
tests/contracts/discord/README.md.

A violation is recorded in the fake's `ViolationLog`; this module is also a pytest plugin
(conftest.py loads it) that fails the test during which a violation happened, naming the
operation and the field.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError, best_match

CONTRACTS = Path(__file__).parent / "contracts" / "discord"
# The document's server is https://discord.com/api/v10; the fake serves the same paths under /api/v10.
HOST = "https://discord.com"
PREFIX = "/api/v10"

# Which generated schema each gateway payload must match (see refresh.sh for the types they come from).
FAKE_SENDS = {  # opcode, or opcode 0 with its event name
    10: "hello",
    11: "heartbeat_ack",
    9: "invalid_session",
    "READY": "ready",
    "RESUMED": "resumed",
    "GUILD_CREATE": "guild_create",
    "MESSAGE_CREATE": "message_create",
    "MESSAGE_UPDATE": "message_update",
    "MESSAGE_REACTION_ADD": "message_reaction_add",
    "INTERACTION_CREATE": "interaction_create",
}
BOT_SENDS = {1: "heartbeat", 2: "identify", 6: "resume"}
# INTERACTION_CREATE's type is a union; the schema of the command kind at hand names a field better.
INTERACTION_KINDS = {1: "chat_input_interaction", 3: "message_command_interaction"}  # data.type -> schema


@dataclass(frozen=True)
class Violation:
    """One place where what crossed the fake differs from Discord's contract."""

    operation: str  # the OpenAPI operationId, or the gateway payload's event / opcode
    part: str  # "request", "response 200", "gateway payload from the fake", ...
    field: str  # dotted path of the offending field; "" for the whole thing
    message: str

    def __str__(self) -> str:
        return f"{self.operation} {self.part}: {self.field or '(whole)'}: {self.message}"


class ContractViolation(AssertionError):
    """What crossed the fake Discord differs from Discord's published contract."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        lines = "\n".join(f"  {violation}" for violation in violations)
        super().__init__(f"{len(violations)} Discord contract violation(s):\n{lines}")


@dataclass
class ViolationLog:
    """The violations one fake saw. Open while the fake runs, so the plugin can find it."""

    violations: list[Violation] = field(default_factory=list)
    reported: int = 0  # how many of them already failed a test

    def add(self, violations: Iterable[Violation]) -> None:
        self.violations.extend(violations)

    def take(self) -> list[Violation]:
        """Every violation so far, forgotten: for a test that provokes them on purpose."""
        taken, self.violations, self.reported = self.violations, [], 0
        return taken

    def open(self) -> None:
        _OPEN_LOGS.append(self)

    def close(self) -> None:
        """Stop watching; raise ContractViolation for what no test has reported yet."""
        if self in _OPEN_LOGS:
            _OPEN_LOGS.remove(self)
        _raise_unreported([self])


# The logs of the fakes running now. A registry rather than a fixture, because fakes are started by
# many fixtures and inside tests alike; each fake opens its log on start and closes it on stop.
_OPEN_LOGS: list[ViolationLog] = []


def _raise_unreported(logs: list[ViolationLog]) -> None:
    unreported: list[Violation] = []
    for log in logs:
        unreported += log.violations[log.reported :]
        log.reported = len(log.violations)
    if unreported:
        raise ContractViolation(unreported)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test (not just its teardown) during which a fake saw a contract violation."""
    try:
        return (yield)
    finally:
        _raise_unreported(list(_OPEN_LOGS))


# -- REST ------------------------------------------------------------------------------------------


def snowflakes_to_strings(value: Any) -> Any:
    """Integer values of `id` / `*_id` fields as strings, as Discord's document types them; nothing
    else changes. (discord.py sends some snowflakes as JSON integers, which Discord accepts.)"""
    if isinstance(value, dict):
        return {
            key: str(item) if _is_snowflake_key(key) and type(item) is int else snowflakes_to_strings(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [snowflakes_to_strings(item) for item in value]
    return value


def _is_snowflake_key(key: str) -> bool:
    return key == "id" or key.endswith("_id")


@functools.cache
def _document() -> dict[str, Any]:
    return json.loads((CONTRACTS / "openapi.json").read_text())


@functools.cache
def _openapi() -> Any:
    """Discord's document, loaded once per test session (about half a second)."""
    from openapi_core import Config, OpenAPI

    # The document is checked when refreshed, not on every load (that alone takes seconds). Fields
    # the document does not name are refused: neither the bot nor the fake may invent them.
    config = Config(spec_validator_cls=None, additional_properties_default_policy="forbid")
    document = _document()
    return OpenAPI.from_dict(_merge_object_all_of(document, document["components"]["schemas"]), config=config)


def _merge_object_all_of(node: Any, schemas: dict[str, Any]) -> Any:
    """Each `allOf` of plain object schemas (ErrorResponse = Error + errors) as the one object it means.
    Refusing unknown fields judges each part alone, and each part knows only its own fields."""
    if isinstance(node, list):
        return [_merge_object_all_of(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _merge_object_all_of(value, schemas) for key, value in node.items()}
    parts = [_resolve(part, schemas) for part in node.get("allOf", [])]
    plain = {"type", "properties", "required", "description"}
    if parts and all(part.get("type") == "object" and set(part) <= plain for part in parts):
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for part in parts:
            merged["properties"].update(part.get("properties", {}))
            merged["required"] += part.get("required", [])
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **merged}
    return node


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


@functools.cache
def _operations() -> list[tuple[re.Pattern[str], dict[str, str]]]:
    """(path regex, {method: operationId}) for every path, literal paths (`/users/@me`) first."""
    routes = []
    for template, item in _document()["paths"].items():
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"{[^}]+}", "[^/]+", pattern)
        methods = {method.upper(): op["operationId"] for method, op in item.items() if "operationId" in op}
        routes.append((template.count("{"), re.compile(f"{pattern}$"), methods))
    routes.sort(key=lambda route: route[0])
    return [(regex, methods) for _, regex, methods in routes]


def operation_id(method: str, path: str) -> str | None:
    """The operationId of `method path` (path without /api/v10), or None if Discord has no such operation."""
    for regex, methods in _operations():
        if regex.match(path):
            return methods.get(method.upper())
    return None


def _mock_request(method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any) -> Any:
    from openapi_core.testing import MockRequest

    data = None if body is None else json.dumps(snowflakes_to_strings(body)).encode()
    return MockRequest(HOST, method, PREFIX + path, args=dict(query), headers=dict(headers), data=data)


def check_request(
    method: str, path: str, *, query: dict[str, str], headers: dict[str, str], body: Any
) -> list[Violation]:
    """What is wrong with a request (path without /api/v10; body parsed JSON or None)."""
    operation = operation_id(method, path)
    if operation is None:
        return [Violation(f"{method} {path}", "request", "", "Discord's OpenAPI document has no such operation")]
    request = _mock_request(method, path, query, headers, body)
    errors = _openapi().iter_request_errors(request)
    return [v for error in errors for v in _violations(operation, "request", error) if not _erratum(v)]


def check_response(
    method: str, path: str, *, query: dict[str, str], headers: dict[str, str], body: Any, status: int, answer: Any
) -> list[Violation]:
    """What is wrong with the fake's answer `answer` (parsed JSON or None) with `status`."""
    from openapi_core.testing import MockResponse

    operation = operation_id(method, path)
    if operation is None:
        return []  # the request is reported already
    request = _mock_request(method, path, query, headers, body)
    if answer is None:
        response = MockResponse(b"", status_code=status, content_type="")
    else:
        response = MockResponse(json.dumps(answer).encode(), status_code=status)
    part = f"response {status}"
    errors = _openapi().iter_response_errors(request, response)
    return [v for error in errors for v in _violations(operation, part, error) if not _erratum(v)]


# Where the document contradicts Discord's docs, the docs win (the document's README: "follow the
# docs, not the spec"). Each erratum: the operation ("" for any), the part, the field, the message,
# and the sources that say otherwise. Nothing else is forgiven.
ERRATA = [
    # A field error's code is a string ("BASE_TYPE_REQUIRED"; docs: Reference > Error Messages);
    # discord-api-types agrees (RESTErrorFieldInformation.code: string). The document says integer.
    ("", "response 400", re.compile(r"errors(\.[^.]+)*\._errors\.\d+\.code"), "is not of type 'integer'"),
    # A 429's `code` is optional, "an error code for some limits" (docs: Topics > Rate Limits, Rate
    # Limit Response Structure; discord-api-types RESTRateLimit.code?). The document requires it.
    ("", "response 429", re.compile("code"), "'code' is a required property"),
    # `nsfw` of a command (docs: Application Commands > Create Global Application Command, "nsfw?";
    # discord-api-types RESTPostAPIBaseApplicationCommandsJSONBody) is missing from the document's
    # ApplicationCommandUpdateRequest, though its ApplicationCommandResponse has it. discord.py sends it.
    ("bulk_set_application_commands", "request", re.compile(r"\d+\.nsfw"), "('nsfw' was unexpected)"),
    # discord.py (http.handle_message_parameters) puts `tts: false` in every message body, an edit's
    # too; Edit Message takes no `tts` (the document, and discord-api-types'
    # RESTPatchAPIChannelMessageJSONBody) and Discord ignores it. The bot cannot leave it out without
    # going around discord.py. (A library quirk, not a contradiction of the docs.)
    ("update_message", "request", re.compile("tts"), "('tts' was unexpected)"),
    # RESUMED has no documented fields (docs: Gateway Events > Resumed), which discord-api-types writes
    # as `d: undefined`; Discord sends an object there, which discord.py writes into (gateway.py:
    # data['__shard_id__'] = ...). An empty object is what the fake sends.
    ("op 0 RESUMED", "gateway payload from the fake", re.compile("d"), "{} should not be valid under {}"),
]


def _erratum(violation: Violation) -> bool:
    return any(
        operation in ("", violation.operation) and part == violation.part and field.fullmatch(violation.field)
        and message in violation.message
        for operation, part, field, message in ERRATA
    )


def _violations(operation: str, part: str, error: Exception) -> list[Violation]:
    """openapi-core's error as violations, one per field."""
    name = getattr(error, "name", None)  # a query or path parameter, or a header
    where = f"({getattr(error, 'location', 'header')}) {name}" if name else ""
    schema_errors = getattr(error.__cause__, "schema_errors", None)
    if schema_errors:
        found = [v for e in schema_errors for v in _schema_violations(operation, part, e)]
        if where:
            found = [Violation(v.operation, v.part, ".".join(filter(None, (where, v.field))), v.message) for v in found]
        return found
    message = str(error.__cause__ or error)
    return [Violation(operation, part, where, f"{type(error).__name__}: {message}")]


def _schema_violations(operation: str, part: str, error: ValidationError) -> list[Violation]:
    return [Violation(operation, part, field, message) for field, message in _explain(error)]


def _explain(error: ValidationError) -> list[tuple[str, str]]:
    """(field, message) for each field a jsonschema error is about, from the branch of an anyOf /
    oneOf that came closest; where no branch came closer than the others, the deepest field any names."""
    best = best_match([error])
    if not best.context:
        return _fields(best)
    closest = max(best.context, key=lambda e: len(e.absolute_path))
    return [(field, f"{_short(best.message)} (closest: {message})") for field, message in _fields(closest)]


def _fields(error: ValidationError) -> list[tuple[str, str]]:
    """The dotted path of the field an error is about: each unknown field on its own, the missing one."""
    path = [str(part) for part in error.absolute_path]
    if error.message.startswith("Additional properties") and isinstance(error.instance, dict):
        # jsonschema's own check and openapi-core's "forbid" policy alike
        schema = error.schema if isinstance(error.schema, dict) else {}
        known, patterns = set(schema.get("properties", {})), schema.get("patternProperties", {})
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        if extra:
            return [(".".join([*path, k]), f"Additional properties are not allowed ({k!r} was unexpected)")
                    for k in extra]
    elif error.validator == "required" and (missing := re.match(r"'(.+)' is a required property", error.message)):
        path.append(missing[1])  # one error per missing property
    return [(".".join(path), _short(error.message))]


def _short(message: str, limit: int = 200) -> str:
    """jsonschema's message with a long value cut in the middle (the verdict is at its end)."""
    half = limit // 2
    return message if len(message) <= limit else f"{message[:half]} ... {message[-half:]}"


# -- gateway ---------------------------------------------------------------------------------------


@functools.cache
def _gateway_validator(name: str) -> Draft7Validator:
    return Draft7Validator(json.loads((CONTRACTS / "gateway" / f"{name}.json").read_text()))


def check_gateway(payload: dict[str, Any], *, from_client: bool = False) -> list[Violation]:
    """What is wrong with a gateway payload the fake sends (or, `from_client`, one the bot's client sends)."""
    op, event = payload.get("op"), payload.get("t")
    who = "gateway payload from the client" if from_client else "gateway payload from the fake"
    label = f"op {op}" + (f" {event}" if event else "")
    name = BOT_SENDS.get(op) if from_client else FAKE_SENDS.get(event if op == 0 else op)
    if name is None:
        return [Violation(label, who, "", "no schema for this payload in tests/contracts/discord/gateway/")]
    errors = list(_gateway_validator(name).iter_errors(payload))
    if not errors:
        return []
    if name == "interaction_create":  # name the field from the schema of this kind of command
        kind = INTERACTION_KINDS.get(payload.get("d", {}).get("data", {}).get("type"))
        if kind is not None:
            specific = list(_gateway_validator(kind).iter_errors(payload["d"]))
            if specific:
                return [Violation(label, who, f"d.{field}" if field else "d", message)
                        for error in specific for field, message in _explain(error)]
    found = [Violation(label, who, field, message) for error in errors for field, message in _explain(error)]
    return [violation for violation in found if not _erratum(violation)]
