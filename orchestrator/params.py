"""Run parameters as the command line gives them: `--param KEY=VALUE` (VALUE read as YAML) and
`--params JSON|@FILE`.

Both are untrusted text. A VALUE is read with the safe loader less two things: timestamps (`2026-01-31` stays
the string it was typed as, as JSON would carry it) and anchors/aliases (`&a [*a, *a]` nests into a billion
laughs; a one-line value has no use for them). Every failure is a ConfigError naming the parameter or file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError


class _ParamLoader(yaml.SafeLoader):
    """The safe loader without timestamps, refusing anchors and aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError("anchors and aliases (&name, *name) are not allowed in a parameter")
        return super().compose_node(parent, index)


_ParamLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_pair(pair: str) -> tuple[str, Any]:
    """`KEY=VALUE` → (KEY, VALUE read as YAML); an empty VALUE is the empty string."""
    key, sep, text = pair.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param {pair!r}: expected KEY=VALUE")
    if not text:
        return key, ""
    try:
        return key, _load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"--param {key}: invalid YAML value: {problem.splitlines()[0]}") from exc
    except RecursionError as exc:
        raise ConfigError(f"--param {key}: the value is nested too deep") from exc


def _load(text: str) -> Any:
    loader = _ParamLoader(text)  # reading starts here: a control character is refused already
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_json(text: str) -> dict[str, Any]:
    """`--params`: a JSON object, inline or `@FILE`."""
    where = "--params"
    if text.startswith("@"):
        path = Path(text[1:])
        where = f"--params {text}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: {path} is not UTF-8 text (byte {exc.start})") from exc
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: JSON nested too deep") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(loaded).__name__}")
    return loaded
