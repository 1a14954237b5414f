"""Which CosyVoice generation a recipe trains: one setting (the recipe) decides every model-family choice.

A CosyVoice1 recipe (``llm: !new:...TransformerLM``, CosyVoice-300M) needs 50 Hz ``speech_tokenizer_v1``
tokens (< 4096), a 22.05 kHz flow and HiFT, whisper text ids and a python-backend LLM for serving (a
TransformerLM is no Qwen2 model: TensorRT-LLM export does not apply). CosyVoice2/3 recipes (``Qwen2LM`` /
``CosyVoice3LM``) need 25 Hz ``speech_tokenizer_v2`` / ``v3`` tokens (< 6561), 24 kHz acoustic models and
the Qwen2 -> TensorRT-LLM export. Deriving all of that from the recipe (:func:`recipe_family`) means a
deployment switches generation by changing the recipe only; a setting that contradicts it (a v2 tokenizer
file with a v1 recipe) is refused by :meth:`ModelFamily.check_tokenizer` before any work.

Only the tags of the recipe's ``llm`` (else ``flow``) section are read: nothing is imported or built.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import yaml

from cosyvoice import storage


@dataclass(frozen=True)
class ModelFamily:
    """What a model generation fixes. ``trtllm_unsupported``: why TensorRT-LLM export does not apply
    (empty when it does)."""

    name: str
    llm_class: str
    tokenizer_version: str  # the key of cosyvoice.features.stages.TOKENIZER_RATES
    speech_tokenizer: str  # the released file name in a model dir
    tokens_per_second: int
    codebook_size: int
    sample_rate: int
    config_file: str  # the recipe's name in a released model dir
    trtllm_unsupported: str = ""
    served_by: str = "cosyvoice2"  # the Triton BLS model (and gateway model name) that serves the family

    def check_tokenizer(self, speech_tokenizer: str, tokenizer_version: str, recipe: str) -> None:
        """Refuse a speech-tokenizer file or token version that belongs to another generation than
        ``recipe``'s (ValueError naming both and the fix); empty settings mean "the family's"."""
        problems = []
        named = _tokenizer_version_of(speech_tokenizer)
        if named and named != self.tokenizer_version:
            problems.append(f"speech tokenizer {speech_tokenizer!r} makes {named} tokens")
        if tokenizer_version and tokenizer_version != self.tokenizer_version:
            problems.append(f"tokenizer_version is {tokenizer_version!r}")
        if problems:
            raise ValueError(
                f"{recipe} is a {self.name} recipe ({self.llm_class}): it trains on {self.tokenizer_version} speech "
                f"tokens ({self.speech_tokenizer}, {self.tokens_per_second} Hz, < {self.codebook_size}), but "
                f"{' and '.join(problems)}. Leave the models resource's speech_tokenizer / tokenizer_version empty "
                f"(they follow the recipe) or set them to {self.speech_tokenizer!r} / {self.tokenizer_version!r}")


COSYVOICE1 = ModelFamily(
    "cosyvoice1", "TransformerLM", "v1", "speech_tokenizer_v1.onnx", 50, 4096, 22050, "cosyvoice.yaml",
    trtllm_unsupported="a CosyVoice1 LLM (TransformerLM: Conformer text encoder + transformer LM) is not a Qwen2 "
                       "model, so the HF Qwen2ForCausalLM / TensorRT-LLM export does not apply; it is served by the "
                       "Triton python-backend LLM model", served_by="cosyvoice")
COSYVOICE2 = ModelFamily("cosyvoice2", "Qwen2LM", "v2", "speech_tokenizer_v2.onnx", 25, 6561, 24000, "cosyvoice2.yaml")
COSYVOICE3 = ModelFamily("cosyvoice3", "CosyVoice3LM", "v3", "speech_tokenizer_v3.onnx", 25, 6561, 24000,
                         "cosyvoice3.yaml")
FAMILIES = (COSYVOICE1, COSYVOICE2, COSYVOICE3)
#: the class a recipe section names (upstream's path or ours) -> its family
_BY_CLASS = {
    "TransformerLM": COSYVOICE1, "Qwen2LM": COSYVOICE2, "CosyVoice3LM": COSYVOICE3,
    "MaskedDiffWithXvec": COSYVOICE1, "CausalMaskedDiffWithXvec": COSYVOICE2,
}
_TOKENIZER_FILE = re.compile(r"speech_tokenizer_(v\d)")


def _tokenizer_version_of(file_name: str) -> str:
    """``v1`` for ``speech_tokenizer_v1.onnx`` (also ``..._v2_25hz``, ``.batch``); "" when the name says nothing."""
    match = _TOKENIZER_FILE.search(file_name.rsplit("/", 1)[-1])
    return match.group(1) if match else ""


def family_by_name(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; one of {', '.join(f.name for f in FAMILIES)}")


def config_file_family(model_dir: str) -> ModelFamily | None:
    """The family whose recipe file name (``cosyvoice.yaml``, ``cosyvoice2.yaml``, ``cosyvoice3.yaml``) a model
    dir (path or URL) holds -- upstream's ``AutoModel`` rule, nothing read; None without one. Two families'
    files in one dir are a ValueError: a model dir is one generation."""
    present = [f for f in FAMILIES if storage.exists(storage.join(model_dir, f.config_file))]
    if len(present) > 1:
        raise ValueError(f"{model_dir}: holds {' and '.join(f'{f.config_file} ({f.name})' for f in present)}; "
                         "a model dir is one generation")
    return present[0] if present else None


def model_dir_family(model_dir: str) -> ModelFamily | None:
    """The family of a released model dir (path or URL) by the recipe it carries (the file
    :func:`config_file_family` finds, read with :func:`recipe_family`); None without one."""
    family = config_file_family(model_dir)
    return None if family is None else recipe_family(storage.join(model_dir, family.config_file))


def recipe_family(recipe: str) -> ModelFamily:
    """The family of a recipe yaml (a path/URL or its text), from the class its ``llm`` section builds
    (or, for an acoustic-only model-dir yaml, its ``flow`` section)."""
    is_text = "\n" in recipe
    source = "recipe text" if is_text else recipe
    try:
        text = recipe if is_text else storage.read_text(recipe)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{recipe}: no such recipe (the training resource's recipe, "
                                "COSYVOICE_TRAIN_RECIPE)") from exc
    root = yaml.compose(io.StringIO(text), Loader=yaml.SafeLoader)
    sections = {str(k.value): v for k, v in root.value} if isinstance(root, yaml.MappingNode) else {}
    for section in ("llm", "flow"):
        node = sections.get(section)
        tag = (node.tag or "") if node is not None else ""
        if tag.startswith("!new:"):
            cls = tag.split(":", 1)[1].rsplit(".", 1)[-1]
            if cls in _BY_CLASS:
                return _BY_CLASS[cls]
            raise ValueError(f"{source}: its `{section}` section builds {tag[5:]}, which belongs to no known CosyVoice "
                             f"generation ({', '.join(sorted(_BY_CLASS))})")
    raise ValueError(f"{source}: no `llm` or `flow` section built with !new: -- not a CosyVoice recipe")
