"""The stage table (``cosyvoice/stages.py``) against its faces: the CLI parser and the Definitions.

A stage that lacks a face, a face that shows another description, or two faces that call different
functions fail here (litgpt checks its command table against its parser the same way)."""

import argparse
import inspect
import types
from unittest import mock

import pytest

from cosyvoice.cli import build_parser
from cosyvoice.stages import BY_COMMAND, STAGES, TOOLS

#: stages whose asset hands the work to a launcher resource (pipelines/launchers.py) by design:
#: checked by their own tests below instead of by the asset body's names
LAUNCHED = {"llm_checkpoint", "flow_checkpoint", "hift_checkpoint", "trtllm_engine"}
def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


@pytest.fixture(scope="module")
def commands():
    return subparsers(build_parser())


@pytest.fixture(scope="module")
def defs():
    from pipelines.definitions import defs

    return defs


def test_every_subcommand_is_a_stage_or_a_tool_of_the_table(commands):
    assert set(commands.choices) == set(BY_COMMAND) | set(TOOLS), "command table and parser out of sync"
    assert not set(BY_COMMAND) & set(TOOLS)


def test_every_stage_is_an_asset_and_every_asset_a_stage(defs):
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == set(STAGES)


def test_every_table_function_is_the_named_library_function():
    for row in [*STAGES.values(), *TOOLS.values()]:
        function = row.function
        assert callable(function) and f"{function.__module__}:{function.__name__}" == row.target, row
        assert not function.__module__.startswith(("assets", "pipelines")), row


def test_each_subcommand_shows_its_table_description(commands):
    shown = {a.dest: a.help for a in commands._choices_actions}
    for command, row in [*BY_COMMAND.items(), *TOOLS.items()]:
        assert shown[command] == row.description, command


def test_each_asset_shows_its_stage_description(defs):
    """The description's first line is the table's (an asset may add a paragraph after it)."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    for name, stage in STAGES.items():
        assert (graph.get(dg.AssetKey(name)).description or "").splitlines()[:1] == [stage.description], name


def sample_argv(command: str, parser: argparse.ArgumentParser, existing_file: str) -> list[str]:
    """Every option that takes a value, with a value of its type (the function is a mock: nothing is
    read except positional files, which get ``existing_file``)."""
    argv = [command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse.BooleanOptionalAction,
                               argparse._AppendAction)):
            continue
        value = (str(action.choices[0]) if action.choices else
                 "1" if action.type in (int, float) else "x")
        argv += [existing_file] if not action.option_strings else [action.option_strings[0], value]
    return argv


@pytest.mark.parametrize("command", [*BY_COMMAND, *TOOLS])
def test_each_subcommand_calls_its_table_function(commands, command, tmp_path):
    row = BY_COMMAND.get(command) or TOOLS[command]
    module, _, attribute = row.target.partition(":")
    (tmp_path / "file").write_text("")
    args = build_parser().parse_args(sample_argv(command, commands.choices[command], str(tmp_path / "file")))
    with mock.patch(f"{module}.{attribute}") as function:
        try:
            args.func(args)
        except Exception:  # the handler goes on with the mock's answer; only the call matters here
            pass
    assert function.called, f"`cosyvoice-pipeline {command}` does not call {row.target}"


def called_names(function, seen: set) -> set[str]:
    """Global names the function's code (and that of helpers of its own module it calls) refers to."""
    function = inspect.unwrap(function)
    if function in seen:
        return set()
    seen.add(function)
    names: set[str] = set()
    stack = [function.__code__]
    while stack:
        code = stack.pop()
        names |= set(code.co_names)
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    for name in list(names):
        helper = function.__globals__.get(name)
        if inspect.isfunction(helper) and helper.__module__ == function.__module__:
            names |= called_names(helper, seen)
    return names


@pytest.mark.parametrize("name", [n for n in STAGES if n not in LAUNCHED])
def test_each_asset_body_calls_its_table_function(defs, name):
    import dagster as dg

    body = defs.get_assets_def(dg.AssetKey(name)).op.compute_fn.decorated_fn
    stage = STAGES[name]
    namespace = inspect.unwrap(body).__globals__
    assert any(namespace.get(n) is stage.function for n in called_names(body, set())), (
        f"asset {name} does not call {stage.target}")


@pytest.mark.parametrize("model,trainer_model", [("llm", "llm"), ("flow", "flow"), ("hift", "hifigan")])
def test_each_checkpoint_asset_launches_the_train_subcommand(defs, model, trainer_model):
    """The asset runs the CLI face (``cosyvoice-pipeline train --model ...`` under torchrun or in a
    pod): the argv its options produce names the table's subcommand and the model, and the body
    launches that argv."""
    import dagster as dg

    from assets.training import TrainConfig, train_options
    from pipelines.resources import TrainingResource

    options = train_options(TrainConfig(), TrainingResource(model_dir="/models"), "run1", "train.list", "cv.list", model)
    argv = options.to_argv()
    assert argv[0] == STAGES[f"{model}_checkpoint"].command and argv[argv.index("--model") + 1] == trainer_model
    body = defs.get_assets_def(dg.AssetKey(f"{model}_checkpoint")).op.compute_fn.decorated_fn
    assert {"train_options", "to_argv", "launch"} <= called_names(body, set())


def test_trtllm_engine_builds_with_the_table_function_on_this_machine(defs, tmp_path):
    """The asset hands the build to the deployment's EngineBuilder; the local one calls build_engine
    (the distributed one runs trtllm-build in the TensorRT-LLM pod)."""
    import dagster as dg

    from pipelines.launchers import LocalEngineBuilder

    body = defs.get_assets_def(dg.AssetKey("trtllm_engine")).op.compute_fn.decorated_fn
    assert "build" in called_names(body, set())
    module, _, attribute = STAGES["trtllm_engine"].target.partition(":")
    with mock.patch(f"{module}.{attribute}") as function:
        try:
            LocalEngineBuilder().build(mock.MagicMock(), "ckpt", str(tmp_path), max_batch_size=1, max_num_tokens=8,
                                       gemm_plugin="auto")
        except Exception:
            pass
    assert function.called
