"""The docs say only what is true: the README's stage table is the stage table (and docs/stages.md
lists its tools), the README's account of ``make demo`` names the assets ``pipelines/demo.py``
materializes, and every file of this repository the docs cite exists (nothing outside it is cited)."""

from __future__ import annotations

import glob
import os
import re
import subprocess

from cosyvoice.stages import STAGES, TOOLS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _between(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker}: begin[^>]*-->\n?(.*?)\n?<!-- {marker}: end -->", text, re.S)
    assert match, f"no '<!-- {marker}: begin -->' ... '<!-- {marker}: end -->' block"
    return match.group(1)


def stage_table_markdown() -> str:
    """The README's table, rendered from ``cosyvoice.stages.STAGES`` (paste it when this test fails)."""
    rows = ["| stage (asset) | CLI subcommand | library function | what it does |", "|---|---|---|---|"]
    for stage in STAGES.values():
        module, _, function = stage.target.partition(":")
        rows.append(f"| `{stage.name}` | `{stage.command}` | `{module}.{function}` | {stage.description} |")
    return "\n".join(rows)


def test_the_readme_stage_table_is_the_stage_table():
    table = _between(_read(README), "stage table")
    listed = [re.findall(r"`([^`]+)`", line)[:2] for line in table.splitlines()[2:]]
    assert listed == [[s.name, s.command] for s in STAGES.values()], "README stage table != cosyvoice/stages.py"
    assert table == stage_table_markdown(), "replace the README's stage table with:\n" + stage_table_markdown()


def test_the_readme_names_exactly_the_assets_make_demo_materializes():
    import dagster as dg

    import pipelines.demo

    materialized = {v.key.to_user_string() for v in vars(pipelines.demo).values() if isinstance(v, dg.AssetsDefinition)}
    said = set(re.findall(r"`([^`]+)`", _between(_read(README), "demo assets")))
    assert said == materialized
    assert "llm_checkpoint" not in materialized and "stops at the training lists" in _read(README)
    assert "pipelines.demo" in _read(os.path.join(REPO, "Makefile"))


def test_docs_stages_lists_exactly_the_tools_of_the_stage_table():
    block = _between(_read(os.path.join(REPO, "docs", "stages.md")), "tools")
    listed = [re.findall(r"`([^`]+)`", line)[0] for line in block.splitlines()[2:]]
    assert listed == list(TOOLS)


def _tracked_top_level() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return {f.split("/")[0] for f in files}


def cited_paths(path: str, text: str, top_level: set[str]) -> list[str]:
    """Paths in backticks that start in this repository (or leave it: ``shared/``, ``../``), and
    relative link targets. The section headings of compatibility.md name upstream's files."""
    found = []
    for line in text.splitlines():
        if os.path.basename(path) == "compatibility.md" and line.startswith("#"):
            continue
        for token in re.findall(r"`([^`\s]+)`", line):
            token = token.split("::")[0].rstrip(".,:;")
            if "/" in token and not any(c in token for c in "<>{}*…$[]|") and \
                    token.split("/")[0] in top_level | {"shared", ".."}:
                found.append(token)
        for target in re.findall(r"\]\(([^)#\s]+)", line):
            if not re.match(r"[a-z]+://", target):
                found.append(os.path.relpath(os.path.join(os.path.dirname(path), target), REPO))
    return found


def test_the_docs_cite_only_files_of_this_repository_that_exist():
    top_level = _tracked_top_level()
    missing = {}
    for path in DOCS:
        for cited in cited_paths(path, _read(path), top_level):
            resolved = os.path.normpath(os.path.join(REPO, cited))
            if not resolved.startswith(REPO + os.sep) or not os.path.exists(resolved):
                missing.setdefault(os.path.relpath(path, REPO), []).append(cited)
    assert not missing, missing


def test_the_citation_check_sees_a_design_file_outside_the_repository():
    cited = cited_paths(os.path.join(REPO, "docs", "architecture.md"),
                        "the target design is `shared/DESIGN.md`; see [x](../../shared/DESIGN.md)", _tracked_top_level())
    assert cited == ["shared/DESIGN.md", "../shared/DESIGN.md"]
