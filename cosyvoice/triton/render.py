"""Render the CosyVoice2 Triton model repository from our templates, strictly.

The five models keep the upstream names, tensor names/types/dims, decoupled settings and template
variables (``runtime/triton_trtllm/model_repo``). Unlike upstream ``fill_template.py``, which leaves
an unknown ``${...}`` in the file, rendering fails and lists every unknown key and every variable
left unfilled. The one exception is a ``parameters:`` line whose only placeholder is an
*optional* variable (most TensorRT-LLM backend knobs, ``dynamic_chunk_strategy``,
``token2wav_runtime`` and the acoustic runtime's options ``token2wav_seed``, ``token2wav_device``,
...): when the variable is not given the whole line is dropped, so the backend (or the runtime)
uses its own default instead of parsing a literal ``${x}``.

A CosyVoice1 (CosyVoice-300M) model dir has no upstream Triton repository: ``V1_MODELS`` serve it with
the same client protocol (BLS ``cosyvoice``, its TransformerLM on the python backend as
``transformer_llm``, ``token2wav`` at 22.05 kHz), rendered from ``repo_values_v1`` (only ``model_dir``).

``fill_template`` keeps upstream's semantics exactly, for users of upstream templates.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources

import psutil

MODELS = ("cosyvoice2", "tensorrt_llm", "token2wav", "audio_tokenizer", "speaker_embedding")
#: the models ``run.sh`` leaves out when the speaker-info cache replaces reference audio
REFERENCE_AUDIO_MODELS = ("audio_tokenizer", "speaker_embedding")
#: ``runtime/triton_trtllm/run.sh`` defaults besides paths (contract 8.4)
UPSTREAM_DEFAULTS = {
    "triton_max_batch_size": "16",
    "max_queue_delay_microseconds": "0",
    "max_queue_size": "0",
    "decoupled_mode": "True",
    "bls_instance_num": "4",
    "triton_backend": "tensorrtllm",
    "max_beam_width": "1",
    "max_tokens_in_paged_kv_cache": "2560",
    "max_attention_window_size": "2560",
    "kv_cache_free_gpu_mem_fraction": "0.5",
    "exclude_input_in_output": "True",
    "enable_kv_cache_reuse": "False",
    "batching_strategy": "inflight_fused_batching",
    "encoder_input_features_data_type": "TYPE_FP16",
    "logits_datatype": "TYPE_FP32",
}
#: parameter variables that must be given (paths the models open, the batching mode the backend
#: requires); every other variable alone on a ``parameters:`` line is optional
REQUIRED_PARAMETER_VARIABLES = frozenset({"model_dir", "llm_tokenizer_dir", "engine_dir", "batching_strategy",
                                          "token2wav_sample_rate"})
#: models served by a backend that looks its parameters up by name and reads an unfilled
#: ``${key}`` as unset (the TensorRT-LLM backend): an optional parameter not given keeps its line,
#: with the placeholder as its value, instead of being dropped
KEEP_UNSET_PARAMETERS = frozenset({"tensorrt_llm"})
#: the python model that stands in for the TensorRT-LLM backend (``llm_backend="python"``)
HF_LLM_MODEL = "hf_llm_model.py"
#: a CosyVoice1 (CosyVoice-300M) repository: its BLS ``cosyvoice`` and the python-backend ``transformer_llm``
#: (a TransformerLM has no TensorRT-LLM engine) take the places of ``cosyvoice2`` and ``tensorrt_llm``
V1_MODELS = ("cosyvoice", "transformer_llm", "token2wav")
#: every model a template exists for
KNOWN_MODELS = MODELS + ("cosyvoice", "transformer_llm")
#: the python model rendered as ``transformer_llm/1/model.py``
TRANSFORMER_LLM_MODEL = "transformer_llm_model.py"

_PLACEHOLDER = re.compile(r"\$(?:\{([_a-zA-Z][_a-zA-Z0-9]*)\}|([_a-zA-Z][_a-zA-Z0-9]*))")
_OPTIONAL_LINE = re.compile(r'^\s*parameters:\s*\{\s*key:\s*"[^"]+"\s*value:\s*\{\s*string_value:\s*"\$\{(\w+)\}"\s*\}\s*\}\s*$')


class RenderError(ValueError):
    """Unknown keys or unfilled variables; the message lists all of them."""


def templates_dir() -> str:
    return str(resources.files("cosyvoice.triton") / "templates")


def _template_text(model: str) -> str:
    with open(os.path.join(templates_dir(), model, "config.pbtxt"), encoding="utf-8") as f:
        return f.read()


def _code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def template_variables(model: str) -> tuple[set[str], set[str]]:
    """``(required, optional)`` variable names of one model's template (comments ignored)."""
    required: set[str] = set()
    optional: set[str] = set()
    for line in _code_lines(_template_text(model)):
        names = {a or b for a, b in _PLACEHOLDER.findall(line)}
        match = _OPTIONAL_LINE.match(line)
        if match and names == {match.group(1)} and match.group(1) not in REQUIRED_PARAMETER_VARIABLES:
            optional |= names
        else:
            required |= names
    return required, optional - required


def all_variables(models=MODELS) -> tuple[set[str], set[str]]:
    required: set[str] = set()
    optional: set[str] = set()
    for model in models:
        r, o = template_variables(model)
        required |= r
        optional |= o
    return required, optional - required


def render_text(text: str, values: dict[str, str], *, where: str = "<template>", keep_unset: bool = False) -> str:
    """Substitute ``values``; an optional ``parameters:`` line left unset is dropped, or with
    ``keep_unset`` kept with its ``${key}`` placeholder (the TensorRT-LLM backend's "unset");
    raise on any other variable left."""
    out: list[str] = []
    checked: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        match = _OPTIONAL_LINE.match(line)
        if match and match.group(1) not in values and match.group(1) not in REQUIRED_PARAMETER_VARIABLES:
            if keep_unset:
                out.append(line)
            continue
        rendered_line = string.Template(line).safe_substitute(values)
        out.append(rendered_line)
        checked.append(rendered_line)
    rendered = "\n".join(out) + "\n"
    left = sorted({a or b for line in checked for a, b in _PLACEHOLDER.findall(line)})
    if left:
        raise RenderError(f"{where}: unfilled template variables: {', '.join(left)}")
    return rendered


@dataclass
class RenderReport:
    out: str
    models: list[str]
    values: dict[str, str]
    #: optional parameters not given, per model: dropped from our python models' configs ...
    dropped_optional: dict[str, list[str]] = field(default_factory=dict)
    #: ... or kept as ``${key}`` (unset) in ``tensorrt_llm`` (``KEEP_UNSET_PARAMETERS``)
    unset_parameters: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        return f"rendered {len(self.models)} models ({', '.join(self.models)}) into {self.out}"


def repo_values(*, engine_dir: str, hf_dir: str, model_dir: str, decoupled: bool = True, max_batch_size: int = 16,
                bls_instances: int = 4, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The variable values ``run.sh`` fills, from the paths and knobs of ``triton-repo``."""
    values = dict(UPSTREAM_DEFAULTS)
    values.update(engine_dir=engine_dir, llm_tokenizer_dir=hf_dir, model_dir=model_dir,
                  decoupled_mode=str(bool(decoupled)), triton_max_batch_size=str(max_batch_size),
                  bls_instance_num=str(bls_instances))
    values.update(overrides or {})
    return values


def repo_values_v1(*, model_dir: str, decoupled: bool = True, max_batch_size: int = 16, bls_instances: int = 4,
                   overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The variable values of a CosyVoice1 repository (``V1_MODELS``): only ``model_dir`` is a path."""
    values = {k: UPSTREAM_DEFAULTS[k] for k in ("max_queue_delay_microseconds", "max_queue_size")}
    values.update(model_dir=model_dir, decoupled_mode=str(bool(decoupled)), triton_max_batch_size=str(max_batch_size),
                  bls_instance_num=str(bls_instances))
    values.update(overrides or {})
    return values


def token2wav_sample_rate(values: dict[str, str], models) -> str:
    """token2wav's ``sample_rate`` (what clients are told): ``token2wav_sample_rate`` when given, else
    the rate of the acoustic models in ``model_dir`` when it is a folder here (``cosyvoice.yaml``:
    CosyVoice1, 22050), else 22050 for a repository with the CosyVoice1 BLS (``cosyvoice``), else 24000.
    The token2wav model refuses to load when its runtime produces another rate."""
    from cosyvoice.acoustic import runtimes

    if "token2wav_sample_rate" in values:
        return str(values["token2wav_sample_rate"])
    model_dir = str(values.get("model_dir", ""))
    if model_dir and os.path.isdir(model_dir):
        return str(runtimes.sample_rate(model_dir))
    return str(runtimes.SAMPLE_RATES[runtimes.V1 if "cosyvoice" in models else runtimes.V2])


def render_repo(out: str, values: dict[str, str], *, models=MODELS, llm_backend: str = "tensorrtllm") -> RenderReport:
    """Write the repository ``out/<model>/{config.pbtxt, 1/...}`` for ``models``.

    ``out`` is replaced as a whole: the repository is rendered into a hidden sibling folder
    (``.<out>.render-<pid>-*``) and swapped in with ``swap_into_place``, so a failed render leaves
    the previous repository untouched and a server reading ``out`` never sees a half-written one.
    Anything else that was in ``out`` (a model not selected now) is gone afterwards. Staging
    folders of killed renders are removed by the next render.

    ``llm_backend="python"`` renders ``tensorrt_llm`` with the python backend and our HF runner as
    ``1/model.py`` (same interface; for CPU serving and tests). Raises ``RenderError`` listing every
    unknown key (not a variable of any selected template) and every unfilled variable.
    """
    unknown_models = sorted(set(models) - set(KNOWN_MODELS))
    if unknown_models:
        raise RenderError(f"unknown model(s) {unknown_models}; choose from {list(KNOWN_MODELS)}")
    if llm_backend not in ("tensorrtllm", "python"):
        raise RenderError(f"llm_backend must be 'tensorrtllm' or 'python', got {llm_backend!r}")
    values = {k: str(v) for k, v in values.items()}
    if "token2wav" in models:
        values["token2wav_sample_rate"] = token2wav_sample_rate(values, models)
    if "tensorrt_llm" in models and llm_backend == "python":
        values["triton_backend"] = "python"
    required, _ = all_variables(models)
    known = set().union(*all_variables(KNOWN_MODELS))
    problems = []
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)} (template variables: {', '.join(sorted(known))})")
    missing = sorted(required - set(values))
    if missing:
        problems.append(f"unfilled template variables: {', '.join(missing)}")
    if problems:
        raise RenderError("; ".join(problems))
    report = RenderReport(out=out, models=list(models), values=values)
    target = dir_target(out)
    if os.path.exists(target) and not os.path.isdir(target):
        raise RenderError(f"{out}: exists and is not a directory")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_renders(parent, base)
    with replacing_dir(target, prefix=f".{base}.render-{os.getpid()}-") as staged:
        for model in models:
            _render_model(model, os.path.join(staged, model), values, llm_backend, report)
    return report


def _render_model(model: str, dest: str, values: dict[str, str], llm_backend: str, report: RenderReport) -> None:
    shutil.copytree(os.path.join(templates_dir(), model), dest,
                    ignore=shutil.ignore_patterns("config.pbtxt", "__pycache__"))
    keep_unset = model in KEEP_UNSET_PARAMETERS
    text = render_text(_template_text(model), values, where=f"{model}/config.pbtxt", keep_unset=keep_unset)
    with open(os.path.join(dest, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(text)
    _, opt = template_variables(model)
    unset = sorted(opt - set(values))
    (report.unset_parameters if keep_unset else report.dropped_optional)[model] = unset
    if model == "tensorrt_llm" and llm_backend == "python":
        shutil.copyfile(os.path.join(os.path.dirname(__file__), HF_LLM_MODEL), os.path.join(dest, "1", "model.py"))
        gitkeep = os.path.join(dest, "1", ".gitkeep")
        if os.path.exists(gitkeep):
            os.unlink(gitkeep)
    if model == "transformer_llm":
        shutil.copyfile(os.path.join(os.path.dirname(__file__), TRANSFORMER_LLM_MODEL), os.path.join(dest, "1", "model.py"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dest, "1", ".gitkeep"))


# --- atomic replacement of a repository folder ----------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS, libc
    or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE): {os.strerror(code)}")


def dir_target(out: str) -> str:
    """The folder that replacing ``out`` replaces: a symlink's target, else ``out`` made absolute."""
    return os.path.realpath(out) if os.path.islink(out) else os.path.abspath(out)


@contextlib.contextmanager
def replacing_dir(out: str, *, prefix: str) -> Iterator[str]:
    """A fresh folder (``prefix*``) beside the folder ``out`` stands for (``dir_target``), to be filled
    by the ``with`` body; when the body succeeds it becomes ``out`` as a whole (``swap_into_place``),
    when it raises ``out`` is left untouched. The staging folder (the failed content, or the previous
    ``out``) is removed either way."""
    target = dir_target(out)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield staged
        os.chmod(staged, 0o755)
        swap_into_place(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def swap_into_place(staged: str, target: str) -> None:
    """Make the complete folder ``staged`` the folder at ``target``; afterwards ``staged`` holds
    the previous repository (if any) for the caller to remove.

    Linux: one ``renameat2(RENAME_EXCHANGE)``, so a reader opening ``target/...`` sees the old or
    the new repository, never a mix and never no repository. Elsewhere: two renames (old aside,
    new in); ``target`` is then absent for the instant between them, never half-written."""
    if not os.path.exists(target):
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        return
    aside = staged + ".old"
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, staged)


def _remove_stale_renders(parent: str, base: str) -> None:
    """Remove the staging folders of renders into ``parent/base`` whose process is gone (killed
    mid-render); a live concurrent render's folder is left alone."""
    prefix = f".{base}.render-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)



# --- upstream scripts/fill_template.py semantics ---------------------------------------------------

def split_escaped(text: str, delimiter: str) -> list[str]:
    """Split on ``delimiter``; a backslash makes the next character literal."""
    parts, current, escape = [], "", False
    for char in text:
        if escape:
            current += char
            escape = False
        elif char == delimiter:
            parts.append(current)
            current = ""
        elif char == "\\":
            escape = True
        else:
            current += char
    parts.append(current)
    return parts


def fill_template(text: str, substitutions: str, *, where: str = "<template>") -> str:
    """Upstream ``fill_template.py``: ``key:value,...`` (``\\`` escapes), defaults
    ``max_queue_size=0`` and ``max_queue_delay_microseconds=0``, every given key must occur in the
    text, unknown ``${...}`` are left as they are."""
    values: dict[str, object] = {"max_queue_size": 0, "max_queue_delay_microseconds": 0}
    for item in split_escaped(substitutions, ","):
        pair = split_escaped(item, ":")
        if len(pair) != 2:
            raise ValueError(f"{where}: substitution {item!r} is not key:value (escape ':' and ',' with '\\')")
        key, value = pair
        if key not in text:
            raise ValueError(f"key '{key}' does not exist in the file {where}.")
        values[key] = value
    return string.Template(text).safe_substitute(values)
