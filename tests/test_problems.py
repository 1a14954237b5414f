"""``UtteranceProblem`` (cosyvoice/problems.py) is the one record of "this utterance was not used, and
why": every stage uses it under that name, never under an alias (an alias such as ``Failure`` sits
next to Dagster's ``dg.Failure`` in an asset module and reads as that)."""

from __future__ import annotations

import ast

from tests.support.source_tree import library_sources


def aliases_of(name: str, source: str) -> list[str]:
    """Module-level names bound to ``name`` itself (``Alias = name`` or ``Alias: type = name``)."""
    found = []
    for node in ast.parse(source).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Name) and value.id == name:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [t.id for t in targets if isinstance(t, ast.Name)]
    return found


def test_utterance_problem_has_no_alias_in_the_library():
    aliases = {path: found for path, text in library_sources().items() if (found := aliases_of("UtteranceProblem", text))}
    assert aliases == {}, "use UtteranceProblem by its name"


def test_the_alias_check_sees_an_alias():
    assert aliases_of("UtteranceProblem", "Failure = UtteranceProblem\nQuarantined: type = UtteranceProblem\n"
                                          "x = UtteranceProblem('u', 'p', 'r', 'd')\n") == ["Failure", "Quarantined"]
