"""Assets decide what, resources decide how: no asset module reads the environment, asks which
deployment it runs in, or spells a location (settings come from the resources chosen in
``pipelines/resources.py``, read there through ``dg.EnvVar``; locations from ``store.layout``)."""

import ast
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
ENV_NAMES = ("environ", "environb", "getenv", "putenv", "deployment")


def environment_reads(source: str) -> list[str]:
    """``os.environ`` / ``os.getenv`` (or imported bare) and ``deployment`` uses, as ``"<line>: <what>"``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in ENV_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom) and any(a.name in ENV_NAMES for a in node.names):
            found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def path_building(source: str) -> list[str]:
    """``os.path.join(...)`` and ``<store>.url(...)`` calls: locations spelled in place."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = ast.unparse(node.func)
            if name in ("os.path.join", "posixpath.join", "storage.join") or node.func.attr == "url":
                found.append((node.lineno, name))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_checkers_find_what_they_look_for():
    source = ("import os\nfrom os import getenv\nfrom pipelines.resources import deployment\n"
              "a = os.environ['X']\nb = os.getenv('Y')\nc = deployment()\n")
    assert [f.split(":")[0] for f in environment_reads(source)] == ["2", "3", "4", "5", "6"]
    assert environment_reads("import os\npath = os.path.basename(p)\n") == []
    assert path_building("p = os.path.join(a, 'b')\nq = store.url('llm', 'llm.pt')\nr = store.layout.llm_model()\n") == [
        "1: os.path.join", "2: store.url"]


def test_no_asset_module_reads_the_environment_or_the_deployment():
    modules = sorted(ASSETS.glob("*.py"))
    assert len(modules) >= 5
    offenders = {p.name: reads for p in modules if (reads := environment_reads(p.read_text()))}
    assert offenders == {}, "settings come from resources (dg.EnvVar in pipelines/resources.py), not from assets"


def test_no_asset_module_builds_a_path():
    offenders = {p.name: found for p in sorted(ASSETS.glob("*.py")) if (found := path_building(p.read_text()))}
    assert offenders == {}, "locations come from store.layout / the training resource"
