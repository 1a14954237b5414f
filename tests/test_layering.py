"""The library imports no Dagster: every module of ``cosyvoice`` imports in a process where
``dagster`` and every ``dagster_*`` package cannot be imported, and no module's source imports
Dagster at all (``dagster_pipes``, the dependency-free client that a launched trainer or export job
reports through, is the one allowed exception, imported lazily where it reports).

Python-backend model files (they import ``triton_python_backend_utils``, which exists only inside
``tritonserver``) are left out of the import check; the source check covers them too."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys

import cosyvoice
from tests.support.source_tree import REPO, library_sources

TRITON_ONLY = "triton_python_backend_utils"
ALLOWED = {"dagster_pipes"}

#: a meta-path finder, installed first, that makes every ``dagster*`` module unimportable
BLOCKER = """
import importlib.abc, sys
class NoDagster(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("dagster"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the library imports no Dagster)", name=name)
        return None
sys.meta_path.insert(0, NoDagster())
"""


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _sources() -> dict[str, set[str]]:
    """Every ``.py`` file below ``cosyvoice/`` (Triton templates included) -> the modules it imports."""
    return {path: _imported_modules(ast.parse(text, path)) for path, text in library_sources().items()}


def library_modules() -> list[str]:
    """Every importable module of the package, less the tritonserver-only python-backend models."""
    names = [m.name for m in pkgutil.walk_packages(cosyvoice.__path__, "cosyvoice.")]
    sources = _sources()

    def triton_only(module: str) -> bool:
        rel = module.replace(".", os.sep)
        imports = sources.get(rel + ".py", sources.get(os.path.join(rel, "__init__.py"), set()))
        return any(m.split(".")[0] == TRITON_ONLY for m in imports)

    return ["cosyvoice"] + [m for m in names if not triton_only(m)]


def _is_dagster(module: str) -> bool:
    top = module.split(".")[0]
    return top.startswith("dagster") and top not in ALLOWED


def test_no_library_source_imports_dagster():
    sources = _sources()
    assert len(sources) > 50, sorted(sources)  # the walk found the package, templates included
    offenders = {path: sorted(m for m in mods if _is_dagster(m)) for path, mods in sources.items()}
    assert not {p: m for p, m in offenders.items() if m}, "the library must not import Dagster"


def test_every_library_module_imports_without_dagster():
    modules = library_modules()
    assert {"cosyvoice.features.extract", "cosyvoice.triton.publish", "cosyvoice.export.engine",
            "cosyvoice.train.trainer", "cosyvoice.cli"} <= set(modules)
    code = BLOCKER + (
        "import importlib, json, traceback\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except BaseException:\n        failed[name] = traceback.format_exc(limit=-3)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster'))\n"
        "print(json.dumps({'failed': failed, 'leaked': leaked}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"failed": {}, "leaked": []}, json.dumps(result, indent=1)[-4000:]


def test_the_blocker_refuses_dagster_and_the_source_check_sees_an_import():
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import pipelines.definitions"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "blocked: the library imports no Dagster" in out.stderr
    tree = ast.parse("import os\ndef f():\n    from dagster import asset\n    import dagster_k8s\n"
                     "    import dagster_pipes\n    importlib.import_module('dagster')\n")
    assert sorted(m for m in _imported_modules(tree) if _is_dagster(m)) == ["dagster", "dagster_k8s"]


#: test folders that mirror something other than a ``cosyvoice`` subpackage
OTHER_TEST_FOLDERS = {"assets": "assets/", "pipelines": "pipelines/", "k8s": "k8s/ manifests",
                      "support": "helpers shared by the tests"}
#: tests at the root that check the repository as a whole rather than one module
REPOSITORY_TESTS = {"test_layering.py", "test_docs.py", "test_capacity.py"}  # the last: bench/capacity.py


def test_the_test_folders_mirror_the_packages():
    """``tests/<package>/`` for ``cosyvoice/<package>/`` (or a folder of OTHER_TEST_FOLDERS);
    ``tests/test_<module>.py`` at the root only for a top-level ``cosyvoice/<module>.py``."""
    tests = os.path.join(REPO, "tests")
    packages = {m.name for m in pkgutil.iter_modules(cosyvoice.__path__) if m.ispkg}
    modules = {m.name for m in pkgutil.iter_modules(cosyvoice.__path__) if not m.ispkg}
    folders = {d for d in os.listdir(tests) if os.path.isfile(os.path.join(tests, d, "__init__.py"))}
    assert folders - packages - set(OTHER_TEST_FOLDERS) == set()
    at_root = {f for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py")}
    assert {f for f in at_root - REPOSITORY_TESTS if f[len("test_"):-len(".py")] not in modules} == set()
