"""Data flow between steps: `${ jmespath }` templates inside step parameters.

A parameter value that is exactly one `${ expr }` takes the expression's value with its JSON type;
a template embedded in a longer string is replaced by the value's text. Expressions see
`params` (the run's parameters) and `steps.<id>.output` / `steps.<id>.status` of earlier steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from orchestrator.errors import ExpressionError

OPEN = "${"
STEPS_FIELD = {"type": "field", "children": [], "value": "steps"}


def _spans(text: str, where: str) -> Iterator[tuple[int, int, str]]:
    """Yield (start, end, expression) for each `${ ... }` in text, matching braces and quotes."""
    start = text.find(OPEN)
    while start != -1:
        depth, quote, i = 1, "", start + len(OPEN)
        while i < len(text) and depth:
            ch = text[i]
            if quote:
                quote = "" if ch == quote and text[i - 1] != "\\" else quote
            elif ch in "'\"`":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth:
            raise ExpressionError(f"field '{where}': unclosed '${{' in {text!r}")
        yield start, i, text[start + len(OPEN) : i - 1].strip()
        start = text.find(OPEN, i)


def _compile(expression: str, where: str) -> Any:
    if not expression:
        raise ExpressionError(f"field '{where}': empty expression '${{}}'")
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        detail = str(exc).splitlines()[0]
        raise ExpressionError(f"field '{where}': invalid expression {expression!r}: {detail}") from exc


def _search(expression: str, where: str, context: Mapping[str, Any]) -> Any:
    try:
        return _compile(expression, where).search(context)
    except JMESPathError as exc:  # a valid expression can still fail on the run's data (a type error, say)
        raise ExpressionError(f"field '{where}': {expression!r} failed on this run's data: {exc}") from exc


def _walk_strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_strings(item, f"{where}[{index}]")


def _leading_field(node: dict[str, Any]) -> str | None:
    if node.get("type") == "field":
        return str(node["value"])
    children = node.get("children", [])
    if node.get("type") in ("subexpression", "index_expression", "projection") and children:
        return _leading_field(children[0])
    return None


def _step_names(node: Any) -> Iterator[str]:
    """Step ids read by a parsed JMESPath AST: every `steps.<id>` access."""
    if not isinstance(node, dict):
        return
    children = node.get("children", [])
    reads_steps = node.get("type") == "subexpression" and children[:1] == [STEPS_FIELD] and len(children) > 1
    if reads_steps and (name := _leading_field(children[1])):
        yield name
    for child in children:
        yield from _step_names(child)


def expressions(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every `${ }` expression in value's strings, with the field path that holds it (not parsed)."""
    for text, path in _walk_strings(value, where):
        for _, _, expression in _spans(text, path):
            yield expression, path


def references(value: Any, where: str) -> dict[str, str]:
    """Map each step id that templates in value read to the place (field path) that reads it.

    Raises ExpressionError for a template that does not parse.
    """
    found: dict[str, str] = {}
    for text, path in _walk_strings(value, where):
        for _, _, expression in _spans(text, path):
            for name in _step_names(_compile(expression, path).parsed):
                found.setdefault(name, path)
    return found


def render(value: Any, context: Mapping[str, Any], where: str = "parameters") -> Any:
    """Return value with every template evaluated against context (`params`, `steps`)."""
    if isinstance(value, str):
        return _render_text(value, context, where)
    if isinstance(value, Mapping):
        return {key: render(item, context, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def _render_text(text: str, context: Mapping[str, Any], where: str) -> Any:
    spans = list(_spans(text, where))
    if not spans:
        return text
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == len(text):
        return _search(spans[0][2], where, context)
    parts, last = [], 0
    for start, end, expression in spans:
        parts.append(text[last:start])
        parts.append(_as_text(_search(expression, where, context)))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def condition(expression: str) -> str:
    """A `when:` condition as a template: `"params.x == 'a'"` and `"${ params.x == 'a' }"` mean the same."""
    text = expression.strip()
    return text if text.startswith(OPEN) and text.endswith("}") else f"${{ {text} }}"


def truthy(value: Any) -> bool:
    """JMESPath truth: false, null, and empty strings, lists and objects are false."""
    if value is None or value is False:
        return False
    return not (isinstance(value, str | list | dict) and not value)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))
