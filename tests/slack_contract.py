"""Slack's published contracts, as checks the fake Slack runs (tests/contracts/slack/).

- `check_call`: a Web API call carries the arguments its reference page marks
  required, within the documented limits (methods.json, Block Kit limits included).
- `check_response`: what the fake answers validates against the response schema
  of Slack's OpenAPI document (Swagger 2.0, frozen in 2020) where it covers the
  method, else against the shape of java-slack-sdk's response sample.
- `check_event`: an event or interaction payload the fake sends has the shape of
  java-slack-sdk's sample (or the reference page's example) of that payload.

Each returns a list of problems, each naming the method (or payload), the
argument or field, and the page it comes from; empty when all is well.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CONTRACTS = Path(__file__).resolve().parent / "contracts" / "slack"
OPENAPI = CONTRACTS / "slack_web_openapi_v2_without_examples.json"
# Test ids keep the kind letter but are short (C1, U2, T1): these id patterns lose their length.
SHORT_IDS = ("defs_bot_id", "defs_channel", "defs_dm_id", "defs_group_id", "defs_team", "defs_user_id",
             "defs_workspace_id")  # fmt: skip
# Which sample an event or interaction payload is compared with, by event type (or payload type).
EVENT_SAMPLES = {
    "app_mention": "java-slack-sdk-samples/events/AppMentionPayload.json",
    "message": "java-slack-sdk-samples/events/MessagePayload.json",
    "message/file_share": "java-slack-sdk-samples/events/MessageFileSharePayload.json",
    "message/bot_message": "java-slack-sdk-samples/events/MessageBotPayload.json",
    "message/message_changed": "java-slack-sdk-samples/events/MessageChangedPayload.json",
    "message/message_deleted": "java-slack-sdk-samples/events/MessageDeletedPayload.json",
    "message/channel_join": "java-slack-sdk-samples/events/MessageChannelJoinPayload.json",
    "message/thread_broadcast": "java-slack-sdk-samples/events/MessageThreadBroadcastPayload.json",
    "app_home_opened": "java-slack-sdk-samples/events/AppHomeOpenedPayload.json",
    "reaction_added": "java-slack-sdk-samples/events/ReactionAddedPayload.json",
    "assistant_thread_started": "docs-examples/assistant_thread_started.json",
    "block_actions": "java-slack-sdk-samples/interactive-components/BlockActionPayload.json",
}
# Fields Slack sends that the sample lacks, each with its evidence: an app_mention with a file
# carries `files` as a message does (slackapi/bolt-js#2056, confirmed by Slack's SDK team).
EVENT_EXTRAS = {"app_mention": {"files": ("java-slack-sdk-samples/events/MessageFileSharePayload.json", "files")}}
# The Events API wrapper is the same for every event ("uniform across all Events API methods").
WRAPPER_SAMPLE = "java-slack-sdk-samples/events/AppMentionPayload.json"
# Blocks in a payload are the bot's own (checked when it posted or published them), not compared
# with a sample's (BlockActionPayload's view even lacks them).
OPAQUE = frozenset({"blocks"})


@cache
def methods() -> dict[str, Any]:
    return json.loads((CONTRACTS / "methods.json").read_text())


@cache
def sample(name: str) -> Any:
    path = CONTRACTS / name
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


# -- arguments ---------------------------------------------------------------


def check_call(method: str, params: dict[str, Any], token: str | None) -> list[str]:
    """What is wrong with a call of `method` with these arguments (as the fake parsed them)."""
    spec = methods()["methods"].get(method)
    if spec is None:
        return [f"{method}: not in tests/contracts/slack/methods.json; add its reference page's arguments"]
    ref = spec["reference"]
    problems = []
    if not token:
        problems.append(f"{method}: no token (Required on every method) ({ref})")
    for name in spec.get("required", []):
        value = params.get(name)
        if value is None or (value == "" and name not in spec.get("may_be_empty", [])):
            problems.append(f"{method}: required argument `{name}` is missing ({ref})")
    one_of = spec.get("one_of")
    if one_of and not any(params.get(name) not in (None, "", []) for name in one_of):
        problems.append(f"{method}: one of {', '.join(f'`{n}`' for n in one_of)} is required ({ref})")
    for name, limit in spec.get("limits", {}).items():
        if params.get(name) is not None:
            problems += _check_limit(method, name, _decoded(params[name]), limit, ref)
    return problems


def _decoded(value: Any) -> Any:
    """A list or object argument as sent: form bodies carry it JSON-encoded."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _check_limit(method: str, name: str, value: Any, limit: dict[str, Any], ref: str) -> list[str]:
    problems = []
    where = f"{method}: argument `{name}`"
    if "max_length" in limit and isinstance(value, str) and len(value) > limit["max_length"]:
        problems.append(f"{where} is {len(value)} characters, over the limit of {limit['max_length']} ({ref})")
    if "max_number" in limit:
        try:
            if int(value) > limit["max_number"]:
                problems.append(f"{where} is {value}, over the maximum of {limit['max_number']} ({ref})")
        except (TypeError, ValueError):
            problems.append(f"{where} is not a number: {value!r} ({ref})")
    if "max_items" in limit:
        if not isinstance(value, list):
            problems.append(f"{where} is not an array ({ref})")
            return problems
        if len(value) > limit["max_items"]:
            problems.append(f"{where} has {len(value)} items, over the limit of {limit['max_items']} ({ref})")
        for index, item in enumerate(value):
            for field in limit.get("item_required", []):
                if not isinstance(item, dict) or not item.get(field):
                    problems.append(f"{where}[{index}] has no `{field}` ({ref})")
        if limit.get("blocks"):
            problems += _check_blocks(f"{where}", value)
    if "blocks_max_items" in limit:
        blocks = value.get("blocks") if isinstance(value, dict) else None
        if not isinstance(blocks, list):
            problems.append(f"{where} has no `blocks` array ({ref})")
        else:
            if len(blocks) > limit["blocks_max_items"]:
                problems.append(f"{where}.blocks has {len(blocks)} blocks, over the limit of "
                                f"{limit['blocks_max_items']} ({ref})")  # fmt: skip
            problems += _check_blocks(f"{where}.blocks", blocks)
    return problems


def _text_of(value: Any) -> str:
    """The text of a text object (or a plain string)."""
    if isinstance(value, dict):
        return str(value.get("text") or "")
    return str(value or "")


def _too_long(where: str, value: Any, limit: int, ref: str) -> list[str]:
    text = _text_of(value)
    if len(text) > limit:
        return [f"{where} is {len(text)} characters, over the limit of {limit} ({ref})"]
    return []


def _check_blocks(where: str, blocks: list[Any]) -> list[str]:
    rules = methods()["blocks"]
    problems = []
    for index, block in enumerate(blocks):
        at = f"{where}[{index}]"
        if not isinstance(block, dict) or not block.get("type"):
            problems.append(f"{at} is not a block with a type ({rules['any']['reference']})")
            continue
        kind = block["type"]
        if block.get("block_id") is not None:
            problems += _too_long(f"{at}.block_id", block["block_id"], rules["any"]["block_id"],
                                  rules["any"]["reference"])  # fmt: skip
        rule = rules.get(kind)
        if rule is None:
            continue  # a kind of block the bot does not send: no limits recorded for it
        ref = rule["reference"]
        if kind in ("section", "header") and "text" in block:
            problems += _too_long(f"{at} ({kind}).text", block["text"], rule["text"], ref)
        if kind == "section":
            fields = block.get("fields") or []
            if len(fields) > rule["fields_max_items"]:
                problems.append(f"{at} (section).fields has {len(fields)} items, over "
                                f"{rule['fields_max_items']} ({ref})")  # fmt: skip
            for number, item in enumerate(fields):
                problems += _too_long(f"{at} (section).fields[{number}]", item, rule["field_text"], ref)
            if isinstance(block.get("accessory"), dict):
                problems += _check_element(f"{at}.accessory", block["accessory"])
        if "elements_max_items" in rule:
            elements = block.get("elements") or []
            if len(elements) > rule["elements_max_items"]:
                problems.append(f"{at} ({kind}).elements has {len(elements)} items, over "
                                f"{rule['elements_max_items']} ({ref})")  # fmt: skip
            if kind != "context":  # a context block holds text and images, no interactive elements
                for number, element in enumerate(elements):
                    problems += _check_element(f"{at}.elements[{number}]", element)
    return problems


def _check_element(at: str, element: Any) -> list[str]:
    rules = methods()["blocks"]
    if not isinstance(element, dict):
        return [f"{at} is not an element"]
    kind = element.get("type")
    problems = []
    if kind == "button":
        rule = rules["button"]
        for field in ("text", "value", "action_id", "url", "accessibility_label"):
            if element.get(field) is not None:
                problems += _too_long(f"{at} (button).{field}", element[field], rule[field], rule["reference"])
    elif kind == "feedback_buttons":
        rule = rules["feedback_buttons"]
        ref = rule["reference"]
        if element.get("action_id") is not None:
            problems += _too_long(f"{at} (feedback_buttons).action_id", element["action_id"], rule["action_id"], ref)
        for side in rule["required"]:
            button = element.get(side)
            if not isinstance(button, dict):
                problems.append(f"{at} (feedback_buttons).{side} is missing ({ref})")
                continue
            for field in ("text", "value"):
                if not _text_of(button.get(field)):
                    problems.append(f"{at} (feedback_buttons).{side}.{field} is missing ({ref})")
            problems += _too_long(f"{at} (feedback_buttons).{side}.text", button.get("text"), rule["button_text"], ref)
            problems += _too_long(f"{at} (feedback_buttons).{side}.value", button.get("value"), rule["button_value"],
                                  ref)  # fmt: skip
            if button.get("accessibility_label") is not None:
                problems += _too_long(f"{at} (feedback_buttons).{side}.accessibility_label",
                                      button["accessibility_label"], rule["button_accessibility_label"], ref)
    if isinstance(element.get("confirm"), dict):
        rule = rules["confirm"]
        for field in ("title", "text", "confirm", "deny"):
            if element["confirm"].get(field) is not None:
                problems += _too_long(f"{at}.confirm.{field}", element["confirm"][field], rule[field],
                                      rule["reference"])  # fmt: skip
    return problems


def check_experience(method: str, params: dict[str, Any], experience: str) -> list[str]:
    """Arguments an app of this messaging experience ("agent": the manifest's `agent_view`;
    "assistant": the legacy `assistant_view`) must leave out: Slack takes the call and silently
    does nothing (setSuggestedPrompts with thread_ts in an agent app)."""
    spec = methods()["methods"].get(method) or {}
    if experience != "agent":
        return []
    return [f"{method}: argument `{name}` must be left out by an agent_view app: the call silently fails "
            f"({spec['reference']})" for name in spec.get("not_for_agent_view", []) if params.get(name)]


def manifest_experience(manifest: Path = CONTRACTS.parent.parent.parent / "slack-manifest.yml") -> str:
    """The messaging experience slack-manifest.yml declares: "agent" or "assistant"."""
    features = (yaml.safe_load(manifest.read_text()) or {}).get("features") or {}
    return "agent" if "agent_view" in features else "assistant"


# -- responses ---------------------------------------------------------------


@cache
def _openapi_definitions() -> dict[str, Any]:
    document = _unions(json.loads(OPENAPI.read_text()))
    definitions = copy.deepcopy(document["definitions"])
    for name in SHORT_IDS:
        definitions[name]["pattern"] = re.sub(r"\{\d+,\}", "+", definitions[name]["pattern"])
    return {"definitions": definitions, "paths": document["paths"]}


def _unions(schema: Any) -> Any:
    """The document writes "one of these" as `items: [A, B]` on a schema that is no array
    (a user, a replies message, bot_id, tz): JSON Schema would check nothing there. Read it
    as `anyOf: [A, B]`, as its generator meant."""
    if isinstance(schema, list):
        return [_unions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _unions(value) for key, value in schema.items()}
    if isinstance(schema.get("items"), list) and schema.get("type") != "array":
        schema["anyOf"] = schema.pop("items")
    return schema


@cache
def _validator(path: str) -> jsonschema.protocols.Validator:
    openapi = _openapi_definitions()
    operation = next(iter(openapi["paths"][path].values()))
    schema = {**operation["responses"]["200"]["schema"], "definitions": openapi["definitions"]}
    return jsonschema.Draft4Validator(schema)


def check_response(method: str, body: dict[str, Any]) -> list[str]:
    """What is wrong with the fake's successful answer to `method` (errors are not checked)."""
    if not isinstance(body, dict) or body.get("ok") is not True:
        return []
    spec = methods()["methods"].get(method)
    if spec is None:
        return [f"{method} response: the method is not in tests/contracts/slack/methods.json"]
    source = spec["response"]
    if "openapi" not in source:
        return [f"{method} response: {p} (java-slack-sdk {source['sample']})"
                for p in shape_problems(body, sample(source["sample"]))]  # fmt: skip
    problems = []
    for error in _validator(source["openapi"]).iter_errors(body):
        problems += _explained(method, source, error)
    return problems


def _explained(method: str, source: dict[str, str], error: jsonschema.ValidationError) -> list[str]:
    """The problems one schema error stands for, after the deviations methods.json allows."""
    path = "/".join(str(part) for part in error.absolute_path)
    allowed = [a for a in methods()["openapi_deviations"]["allowed"] if a["method"] == method]
    if any(a["path"] == path and a["keyword"] == error.validator
           and not (a.get("when_absent") and a["when_absent"] in error.instance) for a in allowed):
        return []
    if error.validator == "additionalProperties":
        return _newer_fields(method, source.get("sample"), list(error.absolute_path), error)
    if error.validator == "anyOf" and error.context:
        # Fine if one alternative holds once the deviations are allowed; else the closest one's problems.
        alternatives: dict[Any, list[str]] = {}
        for sub in error.context:
            alternatives.setdefault(sub.schema_path[0], []).extend(_explained(method, source, sub))
        for index in range(len(error.validator_value)):
            alternatives.setdefault(index, [])
        return min(alternatives.values(), key=len)
    message = error.message if len(error.message) < 300 else error.message[:300] + "..."
    return [f"{method} response: {path or '(top)'}: {message} (OpenAPI {source['openapi']})"]


def _newer_fields(method: str, sample_name: str | None, path: list[Any],
                  error: jsonschema.ValidationError) -> list[str]:  # fmt: skip
    """Fields the 2020 schema does not list: allowed where java-slack-sdk's sample has them
    at the same place with the same shape."""
    listed = set(error.schema.get("properties", {}))
    extras = [key for key in error.instance if key not in listed]
    where = "/".join(str(part) for part in path) or "(top)"
    problems = []
    for key in extras:
        candidates = [c[key] for c in _at(sample(sample_name), path) if isinstance(c, dict) and key in c] \
            if sample_name else []  # fmt: skip
        if not candidates:
            problems.append(f"{method} response: {where}: field `{key}` is in neither the OpenAPI schema nor "
                            "java-slack-sdk's sample")  # fmt: skip
            continue
        if key in OPAQUE:
            problems += [f"{method} response: {p} (java-slack-sdk {sample_name})"
                         for p in shape_problems(error.instance[key], [], f"{where}/{key}")]  # fmt: skip
            continue
        found = [shape_problems(error.instance[key], candidate, f"{where}/{key}") for candidate in candidates]
        best = min(found, key=len)
        problems += [f"{method} response: {p} (java-slack-sdk {sample_name})" for p in best]
    return problems


def _at(value: Any, path: list[Any]) -> Iterator[Any]:
    """The values at `path` in a sample; a list index stands for any of the sample list's items."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        if isinstance(value, list):
            for item in value:
                yield from _at(item, rest)
    elif isinstance(value, dict) and head in value:
        yield from _at(value[head], rest)


# -- shapes ------------------------------------------------------------------


def shape_problems(value: Any, model: Any, path: str = "") -> list[str]:
    """Where `value` differs from the shape of a sample (`model`): a field the sample does not
    have, or a different JSON type. The samples blank their values and every field is optional;
    null is accepted anywhere (a sample cannot say what may be null), an empty sample object or
    list stands for any content."""
    at = path or "(top)"
    if value is None or model is None:
        return []
    if isinstance(model, dict):
        if not isinstance(value, dict):
            return [f"{at}: is {_kind(value)}, the sample has an object"]
        if not model:
            return []
        problems = []
        for key, item in value.items():
            where = f"{path}/{key}" if path else key
            if key in OPAQUE:  # an array, whatever the sample's blocks look like
                problems += shape_problems(item, [], where)
                continue
            if key not in model:
                problems.append(f"{where}: field not in the sample")
            else:
                problems += shape_problems(item, model[key], where)
        return problems
    if isinstance(model, list):
        if not isinstance(value, list):
            return [f"{at}: is {_kind(value)}, the sample has an array"]
        if not model:
            return []
        problems = []
        for index, item in enumerate(value):
            found = [shape_problems(item, option, f"{path}[{index}]") for option in model]
            problems += min(found, key=len)
        return problems
    if _kind(value) != _kind(model):
        return [f"{at}: is {_kind(value)}, the sample has {_kind(model)}"]
    return []


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


# -- events ------------------------------------------------------------------


def check_event(body: dict[str, Any]) -> list[str]:
    """What in an Events API body (event_callback) or an interaction payload differs from the
    shape of Slack's sample of it."""
    if body.get("type") == "event_callback":
        event = body.get("event") or {}
        kind = event.get("type", "?")
        if kind == "message" and event.get("subtype"):
            kind = f"message/{event['subtype']}"
        name = EVENT_SAMPLES.get(kind)
        if name is None:
            return [f"event {kind}: no sample recorded in tests/slack_contract.py EVENT_SAMPLES"]
        wrapper = {key: value for key, value in body.items() if key != "event"}
        model_wrapper = {key: value for key, value in sample(WRAPPER_SAMPLE).items() if key != "event"}
        problems = [f"event {kind} wrapper: {p} ({WRAPPER_SAMPLE})" for p in shape_problems(wrapper, model_wrapper)]
        model = dict(sample(name)["event"])
        for field, (source, key) in EVENT_EXTRAS.get(kind, {}).items():
            model[field] = sample(source)["event"][key]
        problems += [f"event {kind}: {p} ({name})" for p in shape_problems(event, model, "event")]
        return problems
    kind = body.get("type", "?")
    name = EVENT_SAMPLES.get(kind)
    if name is None:
        return [f"payload {kind}: no sample recorded in tests/slack_contract.py EVENT_SAMPLES"]
    return [f"payload {kind}: {p} ({name})" for p in shape_problems(body, sample(name))]
