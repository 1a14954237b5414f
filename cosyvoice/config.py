"""Safe loading of HyperPyYAML recipes (ours in ``configs/`` and the upstream recipe yamls unchanged).

HyperPyYAML executes what the tags name at load time (``!apply:os.system [...]`` runs a shell
command), so a recipe is treated as code and checked before HyperPyYAML sees it:

* every tag is parsed (not pattern-matched) and must be one of ``!new: !name: !apply: !ref !copy
  !tuple``; ``!include``, ``!module:``, ``!!python/...`` and anything else are refused;
* upstream class paths (``cosyvoice.llm.llm.Qwen2LM``, ``matcha.utils.audio.mel_spectrogram``, ...)
  are mapped to ours through ``ALIASES``;
* ``!new:`` / ``!name:`` targets are checked by name first: only a dotted name inside an allowed
  module is ever imported (importing runs a module's top-level code, so a hostile recipe must not
  get that far); the imported object must then be a class or function *defined* in an allowed
  module (so ``cosyvoice.llm.lm.random.seed`` is refused: it is defined in ``random``);
* ``!apply:`` is limited to the four seed calls of the recipes.

Sub-trees the caller overrides with ``None`` (``flow``, ``hift`` ... when training the LLM) are
not checked and never built. Upstream functions we do not implement but that a recipe merely
names (e.g. ``cosyvoice.utils.common.fade_in_out``) become :func:`not_implemented` partials that
raise if used.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Mapping
from typing import Any

import yaml

from cosyvoice import storage

ALIASES: dict[str, str] = {
    "cosyvoice.llm.llm.Qwen2LM": "cosyvoice.llm.lm.Qwen2LM",
    "cosyvoice.llm.llm.CosyVoice3LM": "cosyvoice.llm.lm.CosyVoice3LM",
    "cosyvoice.llm.llm.Qwen2Encoder": "cosyvoice.llm.qwen2.Qwen2Encoder",
    "cosyvoice.llm.llm.TransformerLM": "cosyvoice.llm.transformer_lm.TransformerLM",
    "cosyvoice.transformer.encoder.ConformerEncoder": "cosyvoice.llm.transformer.ConformerEncoder",
    "cosyvoice.transformer.encoder.TransformerEncoder": "cosyvoice.llm.transformer.TransformerEncoder",
    "cosyvoice.utils.common.ras_sampling": "cosyvoice.llm.sampling.ras_sampling",
    "cosyvoice.utils.common.nucleus_sampling": "cosyvoice.llm.sampling.nucleus_sampling",
    "cosyvoice.utils.common.random_sampling": "cosyvoice.llm.sampling.random_sampling",
    "cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer": "cosyvoice.dataset.text.get_qwen_tokenizer",
    "whisper.tokenizer.get_tokenizer": "cosyvoice.dataset.text.get_whisper_tokenizer",  # the v1 recipe's
    "matcha.utils.audio.mel_spectrogram": "cosyvoice.dataset.mel.mel_spectrogram",
    "cosyvoice.dataset.processor.parquet_opener": "cosyvoice.dataset.processors.parquet_opener",
    "cosyvoice.dataset.processor.tokenize": "cosyvoice.dataset.processors.tokenize",
    "cosyvoice.dataset.processor.filter": "cosyvoice.dataset.processors.filter_samples",
    "cosyvoice.dataset.processor.resample": "cosyvoice.dataset.processors.resample",
    "cosyvoice.dataset.processor.compute_fbank": "cosyvoice.dataset.processors.compute_fbank",
    "cosyvoice.dataset.processor.parse_embedding": "cosyvoice.dataset.processors.parse_embedding",
    "cosyvoice.dataset.processor.compute_whisper_fbank": "cosyvoice.dataset.processors.compute_whisper_fbank",
    "cosyvoice.dataset.processor.shuffle": "cosyvoice.dataset.processors.shuffle",
    "cosyvoice.dataset.processor.sort": "cosyvoice.dataset.processors.sort",
    "cosyvoice.dataset.processor.batch": "cosyvoice.dataset.processors.batch",
    "cosyvoice.dataset.processor.padding": "cosyvoice.dataset.processors.padding",
    "cosyvoice.dataset.processor.truncate": "cosyvoice.dataset.processors.truncate",
    "cosyvoice.dataset.processor.compute_f0": "cosyvoice.dataset.processors.compute_f0",
    # the acoustic sections are read as settings records (cosyvoice.acoustic.recipe), never built
    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": "cosyvoice.acoustic.recipe.FlowRecord",
    "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder": "cosyvoice.acoustic.recipe.EncoderRecord",
    "cosyvoice.flow.flow_matching.CausalConditionalCFM": "cosyvoice.acoustic.recipe.CFMRecord",
    "omegaconf.DictConfig": "cosyvoice.acoustic.recipe.CFMParamsRecord",
    "cosyvoice.flow.decoder.CausalConditionalDecoder": "cosyvoice.acoustic.recipe.EstimatorRecord",
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "cosyvoice.acoustic.recipe.FlowV1Record",  # CosyVoice1's flow
    "cosyvoice.flow.length_regulator.InterpolateRegulator": "cosyvoice.acoustic.recipe.RegulatorRecord",
    "cosyvoice.flow.flow_matching.ConditionalCFM": "cosyvoice.acoustic.recipe.CFMV1Record",
    "cosyvoice.flow.decoder.ConditionalDecoder": "cosyvoice.acoustic.recipe.EstimatorV1Record",
    "cosyvoice.hifigan.generator.HiFTGenerator": "cosyvoice.acoustic.recipe.HiFTRecord",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": "cosyvoice.acoustic.recipe.F0PredictorRecord",
    "cosyvoice.hifigan.hifigan.HiFiGan": "cosyvoice.acoustic.recipe.HiFiGanRecord",
    "cosyvoice.hifigan.discriminator.MultipleDiscriminator": "cosyvoice.acoustic.recipe.MultipleDiscriminatorRecord",
    "matcha.hifigan.models.MultiPeriodDiscriminator": "cosyvoice.acoustic.recipe.MultiPeriodDiscriminatorRecord",
    "cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator": "cosyvoice.acoustic.recipe.MultiResSpecDiscriminatorRecord",
}

#: upstream namespaces whose unimplemented functions may be *named* (not built) by a recipe
UPSTREAM_NAMESPACES = ("cosyvoice.", "matcha.")
NOT_IMPLEMENTED = "cosyvoice.config.not_implemented"

ALLOWED_MODULES = ("cosyvoice.llm", "cosyvoice.dataset.processors", "cosyvoice.dataset.mel", "cosyvoice.dataset.text",
                   "cosyvoice.config", "cosyvoice.acoustic.recipe", "torch.optim", "torch.nn")
ALLOWED_APPLY = {"random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all"}
PLAIN_TAGS = {"!ref", "!copy", "!tuple"}
_TAG = re.compile(r"^!(new|name|apply):(.+)$")


class UnsafeConfigError(ValueError):
    """The recipe names something that may not be executed at load time."""


def not_implemented(*args, __name__: str = "?", **kwargs):
    raise NotImplementedError(f"{__name__} is named by the recipe but not implemented by cosyvoice-pipeline")


def _in_allowed_module(dotted: str) -> bool:
    return any(dotted == m or dotted.startswith(m + ".") for m in ALLOWED_MODULES)


def _resolve(path: str) -> Any:
    """Import the longest module prefix of ``path`` and walk the rest as attributes. Only called
    for names inside ``ALLOWED_MODULES``, and only allowed prefixes are imported."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if not _in_allowed_module(module_name):
            continue
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _check_target(kind: str, target: str, where: str) -> str:
    """The target HyperPyYAML will import for one tag (after aliasing), or raise."""
    if kind == "apply":
        if target not in ALLOWED_APPLY:
            raise UnsafeConfigError(f"{where}: `!apply:{target}` is not allowed (only {sorted(ALLOWED_APPLY)})")
        return target
    resolved = ALIASES.get(target, target)
    if not _in_allowed_module(resolved):
        if kind == "name" and target.startswith(UPSTREAM_NAMESPACES):
            return NOT_IMPLEMENTED  # named, never imported, raises if a recipe ever calls it
        raise UnsafeConfigError(f"{where}: `!{kind}:{target}` is outside the allowed modules {ALLOWED_MODULES} "
                                f"(supported upstream names: {', '.join(sorted(ALIASES))})")
    obj = _resolve(resolved)
    if obj is None:
        if kind == "name" and target.startswith(UPSTREAM_NAMESPACES):
            return NOT_IMPLEMENTED
        raise UnsafeConfigError(f"{where}: `!{kind}:{target}` is unknown to cosyvoice-pipeline "
                                f"(supported upstream names: {', '.join(sorted(ALIASES))})")
    module = getattr(obj, "__module__", "") or ""
    if not (callable(obj) and _in_allowed_module(module)):
        raise UnsafeConfigError(f"{where}: `!{kind}:{target}` resolves to {module}.{getattr(obj, '__name__', obj)}, "
                                f"outside the allowed modules {ALLOWED_MODULES}")
    return resolved


def _walk(node: yaml.Node, where: str, rewrites: dict[str, str]) -> None:
    tag = node.tag or ""
    if tag.startswith("!"):
        m = _TAG.match(tag)
        if m:
            target = _check_target(m.group(1), m.group(2), where)
            if target != m.group(2):
                rewrites[tag] = f"!{m.group(1)}:{target}"
        elif tag not in PLAIN_TAGS:
            raise UnsafeConfigError(f"{where}: tag `{tag}` is not allowed")
    elif tag.startswith("tag:yaml.org,2002:python") or not tag.startswith("tag:yaml.org,2002:"):
        raise UnsafeConfigError(f"{where}: tag `{tag}` is not allowed")
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _walk(value, f"{where}.{key.value}" if where else str(key.value), rewrites)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _walk(value, f"{where}[{i}]", rewrites)


def sanitize(text: str, skip: set[str] = frozenset()) -> str:
    """Check every tag of a recipe and return the text with upstream targets replaced by ours."""
    root = yaml.compose(io.StringIO(text), Loader=yaml.SafeLoader)
    if root is None:
        return text
    if not isinstance(root, yaml.MappingNode):
        raise UnsafeConfigError("a recipe must be a mapping at the top level")
    rewrites: dict[str, str] = {}
    for key, value in root.value:
        if key.value not in skip:
            _walk(value, str(key.value), rewrites)
    for old in sorted(rewrites, key=len, reverse=True):
        # the old tag is followed by whitespace, a flow indicator or the end of the line
        text = re.sub(re.escape(old) + r"(?=[\s,\]}]|$)", rewrites[old], text)
    return text


def load_recipe(url: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """Load a recipe yaml (local or s3://) safely. Keys overridden with ``None`` are not built;
    overrides for keys the file lacks are dropped (upstream's per-model override dict names
    ``flow``/``hift``/``hifigan`` whether or not a recipe has them)."""
    from hyperpyyaml import load_hyperpyyaml

    text = storage.read_text(url) if isinstance(url, str) and "\n" not in url else url
    top = yaml.compose(io.StringIO(text), Loader=yaml.SafeLoader)
    keys = {k.value for k, _ in top.value} if isinstance(top, yaml.MappingNode) else set()
    overrides = {k: v for k, v in (overrides or {}).items() if k in keys}
    skip = {k for k, v in overrides.items() if v is None}
    return load_hyperpyyaml(sanitize(text, skip), overrides)


def training_overrides(model: str, qwen_pretrain_path: str | None = None) -> dict[str, Any]:
    """Upstream train.py's override dict: every other model set to None (hifigan keeps hift)."""
    out: dict[str, Any] = {k: None for k in ("llm", "flow", "hift", "hifigan") if k != model}
    if model == "hifigan":
        out.pop("hift")
    if qwen_pretrain_path:
        out["qwen_pretrain_path"] = qwen_pretrain_path
    return out

