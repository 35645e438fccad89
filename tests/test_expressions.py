"""Data-flow templates: `${ jmespath }` over params and earlier step outputs."""

from __future__ import annotations

import pytest

from orchestrator import ExpressionError
from orchestrator.expressions import references, render

CONTEXT = {
    "params": {"env": "staging", "n": 3},
    "steps": {"research": {"output": {"summary": "ok", "items": [1, 2]}, "status": "succeeded"}},
}


def test_whole_value_template_keeps_its_json_type() -> None:
    assert render({"items": "${ steps.research.output.items }"}, CONTEXT) == {"items": [1, 2]}
    assert render("${params.n}", CONTEXT) == 3


def test_embedded_templates_are_replaced_by_text() -> None:
    assert render("env=${ params.env } n=${params.n} items=${steps.research.output.items}", CONTEXT) == (
        "env=staging n=3 items=[1,2]"
    )


def test_nested_structures_and_missing_values() -> None:
    assert render({"a": ["${ params.env }", {"b": "${ params.missing }"}], "c": 5}, CONTEXT) == {
        "a": ["staging", {"b": None}],
        "c": 5,
    }


def test_braces_and_quotes_inside_an_expression() -> None:
    assert render("${ {s: steps.research.output.summary, lit: '}'} }", CONTEXT) == {"s": "ok", "lit": "}"}


def test_references_name_each_step_and_where() -> None:
    value = {"a": "${ steps.research.output.summary }", "b": ['${ steps."my-step".output[0] }', "${ params.x }"]}
    assert references(value, "parameters") == {"research": "parameters.a", "my-step": "parameters.b[0]"}


def test_unclosed_template_is_an_error() -> None:
    with pytest.raises(ExpressionError, match=r"field 'p': unclosed '\$\{'"):
        references("${ params.x", "p")


def test_empty_template_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="empty expression"):
        render("${ }", CONTEXT)


def test_an_expression_that_fails_on_the_data_names_its_field() -> None:
    with pytest.raises(ExpressionError, match=r"field 'when': 'length\(params.n\)' failed on this run's data"):
        render("${ length(params.n) }", {"params": {"n": 5}}, "when")
    with pytest.raises(ExpressionError, match=r"field 'parameters.title'"):
        render({"title": "n is ${ abs(params.n) }"}, {"params": {"n": "five"}})
