"""The trainer's options: one typed object from the Dagster config through the command line to the loop.

``cosyvoice-pipeline train`` parses its argv into :class:`TrainOptions` (:meth:`TrainOptions.from_args`);
the ``llm_checkpoint`` asset builds one and launches :meth:`TrainOptions.to_argv`, which parses back
into an equal object (tests/train/test_train_options.py). No torch here: the CLI's parser imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum


class TrainEngine(str, Enum):
    """``--train_engine``: how gradients are synchronised and the optimizer is stepped."""

    torch_ddp = "torch_ddp"
    deepspeed = "deepspeed"


class BatchType(str, Enum):
    """``--batch_type``: dynamic (a frame budget, upstream), token (real LLM tokens, for packing), static."""

    dynamic = "dynamic"
    token = "token"
    static = "static"


#: fields whose flag is not ``--<field>`` (upstream's dotted names)
_FLAGS = {"dist_backend": "--ddp.dist_backend", "save_states": "--deepspeed.save_states"}
#: fields always written by :meth:`TrainOptions.to_argv` (the parser requires them)
_REQUIRED = ("model", "config", "train_data", "cv_data", "model_dir")


@dataclass(frozen=True)
class TrainOptions:
    """The upstream ``train.py`` flags (same names) plus ours (after ``deepspeed_config``): the one
    typed description of a training run. ``cosyvoice-pipeline train`` parses its argv into it
    (:meth:`from_args`) and the Dagster asset builds it and launches :meth:`to_argv`, so no caller
    spells the flags again. Enum fields (:class:`TrainEngine`, :class:`BatchType`) accept the enum or
    its value and hold the plain value: the options are written into every checkpoint's YAML."""

    config: str
    train_data: str
    cv_data: str
    model_dir: str
    model: str = "llm"
    train_engine: str = "torch_ddp"
    checkpoint: str | None = None
    qwen_pretrain_path: str | None = None
    onnx_path: str | None = None
    tensorboard_dir: str | None = "tensorboard"
    dist_backend: str = "nccl"
    num_workers: int = 0
    prefetch: int = 100
    pin_memory: bool = False
    use_amp: bool = False
    dpo: bool = False
    ref_model: str | None = None
    timeout: int = 60
    deepspeed_config: str | None = None
    save_states: str = "model+optimizer"
    # ours
    batch_type: str | None = None  # override the recipe: dynamic | token | static
    max_tokens_in_batch: int | None = None
    max_frames_in_batch: int | None = None
    pack: bool | None = None  # packed sequences (default: on for token batches)
    max_epoch: int | None = None
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps
    save_per_step: int | None = None
    log_interval: int | None = None
    accum_grad: int | None = None
    dpo_beta: float = 0.01
    seed: int = 1986
    peak_flops: float | None = None
    compile: bool = False
    attn_implementation: str | None = None  # sdpa | flash_attention_2 | flex_attention | eager (default: auto)
    allow_random_init: bool = False  # train from a random Qwen2 body on purpose (also recipe key allow_random_init)
    skip_unreadable_shards: bool = False  # skip (log + count) a shard that cannot be read instead of failing

    def __post_init__(self):
        object.__setattr__(self, "train_engine", TrainEngine(self.train_engine).value)
        if self.batch_type is not None:
            object.__setattr__(self, "batch_type", BatchType(self.batch_type).value)

    @classmethod
    def from_args(cls, args) -> TrainOptions:
        """The options of a parsed ``cosyvoice-pipeline train`` command line (an ``argparse.Namespace``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def to_argv(self) -> list[str]:
        """``cosyvoice-pipeline train ...`` arguments that parse back into these options: the required
        flags, then every field that differs from its default."""
        argv = ["train"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in _REQUIRED and value == f.default:
                continue
            flag = _FLAGS.get(f.name, f"--{f.name}")
            if value is None:
                raise ValueError(f"{f.name}=None has no command-line spelling (its default is {f.default!r})")
            if isinstance(value, bool):  # store_true flags (False is their default), or --pack / --no-pack
                argv.append(flag if value else f"--no-{flag[2:]}")
            else:
                argv += [flag, str(value)]
        return argv
