"""Typed options of the feature stages, one frozen dataclass per stage.

The same object travels unchanged from the Dagster config (``assets/features.py``, whose fields are
checked against these) or the CLI flags to the library: the enums replace the hand-checked strings,
so a wrong value fails where it is typed, with the allowed values in the message. Each field's
``help`` metadata is the one description the CLI flag and the Dagster launchpad both show.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, fields, replace


class Device(enum.StrEnum):
    """Where the speech tokenizer runs."""

    cpu = "cpu"
    cuda = "cuda"


class Runtime(enum.StrEnum):
    """What runs the tokenizer: onnxruntime (as upstream) or the torch module built from the same .onnx."""

    onnxruntime = "onnxruntime"
    torch = "torch"


class Precision(enum.StrEnum):
    """fp32 (upstream's tokens) or bf16 (torch runtime; the agreement with fp32 is measured)."""

    fp32 = "fp32"
    bf16 = "bf16"


class LongAudio(enum.StrEnum):
    """Audio longer than the tokenizer's 30 s window: skip (write ``[]``, as upstream) or chunk."""

    skip = "skip"
    chunk = "chunk"


def _help(text: str) -> dict:
    return {"help": text}


WORKERS_HELP = "worker processes (0: one per core)"


@dataclass(frozen=True)
class EmbeddingOptions:
    """How ``extract_embedding`` runs (CAM++ on onnxruntime, one session per worker process)."""

    num_workers: int = field(default=0, metadata=_help(WORKERS_HELP))

    kind = "embedding"  # what ``run_extraction`` computes with these options (not a field)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: one per core), got {self.num_workers}")


@dataclass(frozen=True)
class SpeechTokenOptions:
    """How ``extract_speech_token`` runs."""

    num_workers: int = field(default=0, metadata=_help(WORKERS_HELP))
    device: Device = field(default=Device.cpu, metadata=_help("cpu or cuda"))
    long_audio: LongAudio = field(default=LongAudio.skip, metadata=_help(
        "audio > 30 s: skip (write [], as upstream) or chunk (tokenize consecutive <= 30 s windows)"))
    batch_size: int = field(default=1, metadata=_help(
        "length-sorted padded batches (onnxruntime needs a batch-capable model, e.g. "
        "speech_tokenizer_v2.batch.onnx; the torch runtime batches any tokenizer file)"))
    runtime: Runtime = field(default=Runtime.onnxruntime, metadata=_help(
        "onnxruntime (as upstream) or torch: the module built from the same .onnx, log-mel on the device; "
        "needed for bf16"))
    precision: Precision = field(default=Precision.fp32, metadata=_help(
        "fp32 (upstream's tokens) or bf16 (torch runtime; faster on GPUs, flips a few percent of the tokens; "
        "the agreement with fp32 is measured and reported)"))
    agreement_sample: int = field(default=64, metadata=_help(
        "utterances also run in fp32 to measure the bf16 agreement"))

    kind = "speech_token"

    def __post_init__(self) -> None:
        for name, enum_type in (("device", Device), ("long_audio", LongAudio), ("runtime", Runtime),
                                ("precision", Precision)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                raise ValueError(f"{name} must be one of {', '.join(enum_type)}; got {value!r}") from None
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: one per core), got {self.num_workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision is not Precision.fp32 and self.runtime is not Runtime.torch:
            raise ValueError(f"precision '{self.precision}' needs runtime='torch' (onnxruntime runs the fp32 graph)")


def help_of(options: type, name: str) -> str:
    """The description of one option (what the CLI flag and the Dagster launchpad show)."""
    return next(f.metadata["help"] for f in fields(options) if f.name == name)


def add_option_flags(parser, options: type, *, flags: dict[str, str] | None = None,
                     defaults: dict | None = None) -> None:
    """One ``--<field>`` flag per option (``flags`` renames a flag to its upstream spelling, ``dest``
    stays the field name), with the option's type, default, allowed values and help."""
    flags, defaults = flags or {}, defaults or {}
    types = typing.get_type_hints(options)
    for f in fields(options):
        kind = types[f.name]
        extra = {"choices": list(kind)} if issubclass(kind, enum.Enum) else {}
        flag = flags.get(f.name, f"--{f.name}")
        extra = extra or {"metavar": flag.lstrip("-").upper()}
        parser.add_argument(flag, dest=f.name, type=kind, default=defaults.get(f.name, f.default),
                            help=f.metadata["help"], **extra)


def options_from(options: type, source) -> object:
    """The options object from anything with one attribute per option: parsed flags (see
    :func:`add_option_flags`) or a Dagster run config."""
    return options(**{f.name: getattr(source, f.name) for f in fields(options)})


def with_overrides(options, overrides: dict):
    """``options`` with some fields replaced (validated again); an unknown name is a TypeError."""
    return replace(options, **overrides) if overrides else options


#: the options type of each extraction kind (``ExtractionReport.kind``)
OPTIONS_BY_KIND: dict[str, type] = {"embedding": EmbeddingOptions, "speech_token": SpeechTokenOptions}
