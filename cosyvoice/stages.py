"""The stage table: one row per pipeline stage, naming its three faces.

A stage is a library function first; the ``cosyvoice-pipeline`` subcommand and the Dagster asset
are thin faces of it. This table is where a reader goes from any face to the others in one hop:

    asset key  ->  library function  ->  CLI subcommand  ->  the one-line description all faces show

A subcommand may be the face of several stages (``train --model llm|flow|hifigan`` of
``llm_checkpoint``, ``flow_checkpoint``, ``hift_checkpoint``): :data:`BY_COMMAND` lists each
subcommand once, with its own help line.

The CLI takes each subcommand's help from here (:func:`command_help`), the assets take their
descriptions from here (``description=STAGES["<asset>"].description``), the README's stage table is
checked against it, and ``tests/test_stages.py`` fails when a stage lacks a face or when two faces
call different functions (the CLI handler must dispatch to :attr:`Stage.function`; the asset body
must call it). Subcommands that are not stages of the asset graph (corpus generators, inspection and
maintenance tools) are listed in :data:`TOOLS`, so that every subcommand is accounted for.

Importing this module is cheap (no torch, no dagster): a function is named ``module:attribute`` and
imported on first use of :attr:`Stage.function`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


def _resolve(target: str) -> Callable:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class _Row:
    """A row of either table: ``target`` names the library function as ``module:attribute``."""

    target: str

    @property
    def function(self) -> Callable:
        """The library function itself (imported on first use)."""
        return _resolve(self.target)


@dataclass(frozen=True)
class Stage(_Row):
    """One stage: ``name`` is the asset key, ``target`` the library function, ``command`` the
    ``cosyvoice-pipeline`` subcommand and ``description`` what every face shows."""

    name: str
    target: str
    command: str
    description: str


@dataclass(frozen=True)
class Tool(_Row):
    """A subcommand that is not a stage of the asset graph (it has no asset face)."""

    command: str
    target: str
    description: str


@dataclass(frozen=True)
class Command(_Row):
    """A subcommand of the stages: its function and help line; ``stages`` are the assets it is a face of
    (``train`` of the three ``*_checkpoint`` assets, one per ``--model``)."""

    command: str
    target: str
    description: str
    stages: tuple[str, ...]


_ROWS = (
    Stage("manifest", "cosyvoice.corpus.manifest:prepare_libritts", "prepare-libritts",
          "one LibriTTS subset -> kaldi data dir (wav.scp, text, utt2spk, spk2utt), shard plan and quarantine"),
    Stage("speaker_embeddings", "cosyvoice.features.stages:extract_embedding", "extract-embedding",
          "CAM++ speaker embedding of every utterance (drop-in for tools/extract_embedding.py)"),
    Stage("speech_tokens", "cosyvoice.features.stages:extract_speech_token", "extract-speech-token",
          "S3 speech tokens of every utterance (drop-in for tools/extract_speech_token.py)"),
    Stage("speaker_means", "cosyvoice.features.stages:reduce_speaker_means", "speaker-means",
          "one vector per speaker of a subset: the plain mean of its utterance embeddings"),
    Stage("upstream_feature_files", "cosyvoice.features.stages:export_upstream_features", "upstream-feature-files",
          "utt2embedding.pt / spk2embedding.pt / utt2speech_token.pt of a subset, for the upstream tools"),
    Stage("parquet_shards", "cosyvoice.shards.make_parquet:make_parquet", "make-parquet",
          "parquet training shards in the upstream format (drop-in for tools/make_parquet_list.py)"),
    Stage("training_data_lists", "cosyvoice.shards.lists:make_data_lists", "training-data-lists",
          "train.data.list / cv.data.list over every prepared subset (and each subset's data.list)"),
    Stage("llm_checkpoint", "cosyvoice.train.trainer:train", "train",
          "train the LLM (CosyVoice1 TransformerLM; CosyVoice2/3, SFT or DPO) (flags of upstream cosyvoice/bin/train.py)"),
    Stage("llm_averaged", "cosyvoice.train.checkpoint:average_checkpoints", "average-checkpoints",
          "average the best checkpoints into llm.pt (upstream cosyvoice/bin/average_model.py)"),
    Stage("flow_checkpoint", "cosyvoice.train.trainer:train", "train",
          "train the flow-matching model (train --model flow) on the shards' mel, speech tokens and embeddings"),
    Stage("flow_averaged", "cosyvoice.train.checkpoint:average_checkpoints", "average-checkpoints",
          "average the best flow checkpoints into flow.pt (the released layout)"),
    Stage("hift_checkpoint", "cosyvoice.train.trainer:train", "train",
          "train the HiFT vocoder with its GAN discriminators (train --model hifigan)"),
    Stage("hift_averaged", "cosyvoice.train.checkpoint:average_checkpoints", "average-checkpoints",
          "average the best HiFT checkpoints into hift.pt (the released layout: generator only)"),
    Stage("hf_checkpoint", "cosyvoice.export.hf:export_hf", "export-hf",
          "llm.pt -> HF Qwen2ForCausalLM with speech tokens (TensorRT-LLM/vLLM input)"),
    Stage("trtllm_checkpoint", "cosyvoice.export.variants:convert_variants", "convert-checkpoint",
          "HF export -> TensorRT-LLM checkpoint, optionally quantized (drop-in for convert_checkpoint.py)"),
    Stage("trtllm_engine", "cosyvoice.export.engine:build_engine", "build-engine",
          "trtllm-build a TensorRT-LLM checkpoint into an engine (in the TensorRT-LLM container)"),
    Stage("triton_model_repo", "cosyvoice.triton.publish:publish_triton_repo", "triton-publish",
          "render, validate and load-test the Triton model repository (CosyVoice2: cosyvoice2 BLS + TensorRT-LLM; "
          "CosyVoice1: cosyvoice BLS + python-backend transformer_llm), then publish it as a new version"),
)

#: the help line of a subcommand that several stages share (each stage's row describes its own use)
_SHARED_HELP = {
    "train": "train the LLM (SFT or DPO), the flow or the HiFT vocoder with its GAN "
             "(flags of upstream cosyvoice/bin/train.py)",
    "average-checkpoints": "average the best checkpoints of a run into llm.pt, flow.pt or hift.pt "
                           "(upstream cosyvoice/bin/average_model.py)",
}


def _commands(rows: tuple[Stage, ...]) -> dict[str, Command]:
    """One :class:`Command` per subcommand; a subcommand shared by several stages calls one function
    and shows its ``_SHARED_HELP`` line, one of a single stage shows that stage's description."""
    grouped: dict[str, list[Stage]] = {}
    for stage in rows:
        grouped.setdefault(stage.command, []).append(stage)
    commands = {}
    for command, stages in grouped.items():
        targets = {s.target for s in stages}
        if len(targets) > 1:
            raise ValueError(f"stages {[s.name for s in stages]} share `{command}` but name different functions "
                             f"{sorted(targets)}: a subcommand calls one function")
        if len(stages) > 1 and command not in _SHARED_HELP:
            raise ValueError(f"`{command}` is shared by {[s.name for s in stages]}: give it a help line in _SHARED_HELP")
        help_line = _SHARED_HELP[command] if len(stages) > 1 else stages[0].description
        commands[command] = Command(command, stages[0].target, help_line, tuple(s.name for s in stages))
    return commands


#: the stages in graph order, by asset key
STAGES: dict[str, Stage] = {s.name: s for s in _ROWS}
#: the subcommands of the stages
BY_COMMAND: dict[str, Command] = _commands(_ROWS)

#: subcommands that are not stages of the asset graph
TOOLS: dict[str, Tool] = {t.command: t for t in (
    Tool("make-synthetic-corpus", "cosyvoice.corpus.synthetic:make_synthetic_corpus",
         "a deterministic LibriTTS-shaped corpus"),
    Tool("make-reference-models", "cosyvoice.features.reference_models:make_reference_models",
         "seeded random-weight ONNX + flow/HiFT models with the released signatures and layout"),
    Tool("import-hf", "cosyvoice.export.hf:import_hf", "HF export -> llm.pt (exact for our exports)"),
    Tool("triton-repo", "cosyvoice.triton.render:render_repo",
         "render the CosyVoice2 Triton model repository (strict) and validate it"),
    Tool("fill-template", "cosyvoice.triton.render:fill_template",
         "upstream scripts/fill_template.py semantics (unknown ${...} left as is)"),
    Tool("triton-validate", "cosyvoice.triton.validate:validate_repo",
         "schema (ModelConfig protobuf) + semantic checks of a model repository"),
    Tool("triton-pull", "cosyvoice.triton.publish:pull",
         "download + verify a published version (default: the channel's pointer, LATEST) into a folder"),
    Tool("triton-spk2info", "cosyvoice.triton.spk2info:build_spk2info",
         "spk2info.pt speaker-prompt cache from chosen corpus speakers"),
    Tool("triton-server-env", "cosyvoice.triton.server:build_server_env",
         "build (once) the CPU tritonserver environment used by tests"),
    Tool("synthesize", "cosyvoice.acoustic.synthesis:synthesize",
         "speech tokens (or text, through the HF export of the LLM) -> 24 kHz WAV with the model dir's flow + HiFT"),
    Tool("gateway", "cosyvoice.serve.app:run_gateway",
         "the HTTP gateway over Triton: upstream's FastAPI endpoints, OpenAI /v1/audio/speech, speakers, metrics, web page"),
    Tool("gateway-grpc", "cosyvoice.serve.grpc_server:serve",
         "the gRPC gateway over Triton: upstream's cosyvoice.proto, streamed chunks, gRPC health"),
)}


def command_help(command: str) -> str:
    """The help line of a subcommand: its stage's description, or its tool's."""
    row = BY_COMMAND.get(command) or TOOLS.get(command)
    if row is None:
        raise KeyError(f"{command!r} is neither a stage nor a tool in cosyvoice/stages.py: add it there")
    return row.description
