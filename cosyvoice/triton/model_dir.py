"""The model dir a Triton repository serves, composed from where its acoustic weights come from.

A released CosyVoice2 model dir holds the front-end ONNX models (``campplus.onnx``,
``speech_tokenizer_v2.onnx``), the acoustic weights (``flow.pt``, ``hift.pt``) and the recipe that
sizes them (``cosyvoice2.yaml``). A CosyVoice1 (CosyVoice-300M) dir holds ``speech_tokenizer_v1.onnx``,
its LLM weights too (``llm.pt``: served by the python-backend ``transformer_llm``, not an HF export) and
the recipe as ``cosyvoice.yaml``. When the pipeline trained the models, the served dir is that released
dir with some of those files replaced: :func:`compose_model_dir` builds it in a local folder (the
released files linked when local, downloaded otherwise; the replacements copied in), checks that the
weights it ends up with load strictly under its recipe (so a tiny trained flow is never served with a
full-size recipe, or a trained flow with a released HiFT of another size), and reports each served
weight/recipe file with its source, URL and sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.acoustic import CONFIG_FILE, CONFIG_FILE_V1, FLOW_FILE, HIFT_FILE

#: the CosyVoice1 LLM weights (runtime_v1.LLM_FILE; named here so composing imports no torch model code)
LLM_FILE = "llm.pt"
#: the files whose source is recorded and which the pipeline may replace: the acoustic weights, the
#: CosyVoice1 LLM weights, and the recipe that sizes them (either generation's name)
SERVED_ACOUSTIC_FILES = (FLOW_FILE, HIFT_FILE, CONFIG_FILE, LLM_FILE, CONFIG_FILE_V1)
RELEASED, PIPELINE = "released", "pipeline"


@dataclass(frozen=True)
class ServedFile:
    """One acoustic file of the composed dir: where it came from (``released`` / ``pipeline``),
    its URL there, and the sha256 and size of the bytes served."""

    name: str
    source: str
    url: str
    sha256: str
    bytes: int


@dataclass
class ModelDirReport:
    path: str
    files: dict[str, ServedFile]

    def as_metadata(self) -> dict:
        """``acoustic_files``: ``{file: {source, path, sha256, bytes}}``; ``acoustic_source``:
        ``{file: source}`` (files absent from the dir are left out of both)."""
        return {"acoustic_files": {n: {"source": f.source, "path": f.url, "sha256": f.sha256, "bytes": f.bytes}
                                   for n, f in self.files.items()},
                "acoustic_source": {n: f.source for n, f in self.files.items()}}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def compose_model_dir(dest: str, released_dir: str, replacements: dict[str, str] | None = None, *,
                      check: bool = True) -> ModelDirReport:
    """In the local folder ``dest`` (new, or empty): every file of ``released_dir`` except the names in
    ``replacements`` (``{name in SERVED_ACOUSTIC_FILES: url}``, the pipeline's files), which
    are copied in from their URLs. With ``check``, :func:`check_acoustic_files` (``ValueError``
    naming the files and their sources when they do not load together)."""
    replacements = dict(replacements or {})
    unknown = sorted(set(replacements) - set(SERVED_ACOUSTIC_FILES))
    if unknown:
        raise ValueError(f"compose_model_dir replaces only {', '.join(SERVED_ACOUSTIC_FILES)}; got {unknown}")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ValueError(f"{dest}: exists and is not an empty folder; compose_model_dir writes a new one")
    if storage.is_local(released_dir):
        local = storage.strip_protocol(released_dir)
        if not os.path.isdir(local):
            raise FileNotFoundError(f"{released_dir}: the released model dir does not exist")
        os.makedirs(dest, exist_ok=True)
        for name in sorted(os.listdir(local)):
            if name not in replacements:
                os.symlink(os.path.abspath(os.path.join(local, name)), os.path.join(dest, name))
    else:
        storage.download_dir(released_dir, dest)
        for name in replacements:
            if os.path.exists(os.path.join(dest, name)):
                os.remove(os.path.join(dest, name))
    for name, url in replacements.items():
        storage.download_file(url, os.path.join(dest, name))
    files = {}
    for name in SERVED_ACOUSTIC_FILES:
        path = os.path.join(dest, name)
        if os.path.isfile(path):
            source, url = (PIPELINE, replacements[name]) if name in replacements else (
                RELEASED, storage.join(released_dir, name))
            files[name] = ServedFile(name, source, url, _sha256(path), os.path.getsize(path))
    report = ModelDirReport(dest, files)
    if check:
        check_acoustic_files(report)
    return report


def check_acoustic_files(report: ModelDirReport) -> None:
    """The composed dir's weights load strictly under its recipe, as the served models load them:
    CosyVoice1 (``cosyvoice.yaml``): ``flow.pt`` / ``hift.pt`` as ``runtimes.load_token2wav`` (Token2WavV1)
    and ``llm.pt`` as ``transformer_llm``; CosyVoice2: ``flow.pt`` / ``hift.pt`` under ``cosyvoice2.yaml``
    (the released full-size settings without one), as ``Token2Wav``. Only when both acoustic files are
    there (a dir without them serves no token2wav). ``ValueError`` naming the file, its source and the
    recipe otherwise."""
    if FLOW_FILE not in report.files or HIFT_FILE not in report.files:
        return
    if CONFIG_FILE_V1 in report.files:
        _check_v1_files(report)
        return
    from cosyvoice.acoustic.flow import FlowConfig, load_flow
    from cosyvoice.acoustic.hift import HiFTConfig, load_hift
    from cosyvoice.acoustic.recipe import acoustic_configs

    config = report.files.get(CONFIG_FILE)
    flow_config, hift_config = (acoustic_configs(os.path.join(report.path, CONFIG_FILE)) if config
                                else (FlowConfig.full(), HiFTConfig.full()))
    sizes = f"{CONFIG_FILE} from {config.url} ({config.source})" if config else "the released full sizes (no yaml)"
    _load_each(report, sizes, ((FLOW_FILE, load_flow, flow_config), (HIFT_FILE, load_hift, hift_config)))


def _check_v1_files(report: ModelDirReport) -> None:
    """A CosyVoice1 dir: one generation only, its flow + 22.05 kHz HiFT and (when present) its LLM strictly
    under ``cosyvoice.yaml``."""
    from cosyvoice.acoustic.flow_v1 import load_flow_v1
    from cosyvoice.acoustic.hift import load_hift
    from cosyvoice.acoustic.token2wav_v1 import read_configs_v1

    config = report.files[CONFIG_FILE_V1]
    if CONFIG_FILE in report.files:
        raise ValueError(f"{report.path} holds both {CONFIG_FILE_V1} (CosyVoice1) and {CONFIG_FILE} (CosyVoice2, "
                         f"{report.files[CONFIG_FILE].source}); a model dir is one generation")
    sizes = f"{CONFIG_FILE_V1} from {config.url} ({config.source})"
    flow_config, hift_config = read_configs_v1(report.path)
    checks: list = [(FLOW_FILE, load_flow_v1, flow_config), (HIFT_FILE, load_hift, hift_config)]
    if LLM_FILE in report.files:
        checks.append((LLM_FILE, _load_llm_v1, None))
    _load_each(report, sizes, checks)


def _load_llm_v1(path: str, _config: None) -> None:
    """``llm.pt`` as the ``transformer_llm`` model loads it (its recipe is the dir's ``cosyvoice.yaml``)."""
    from cosyvoice.triton.runtime_v1 import load_transformer_lm

    load_transformer_lm(os.path.dirname(path))


def _load_each(report: ModelDirReport, sizes: str, checks) -> None:
    for name, load, model_config in checks:
        served = report.files[name]
        try:
            load(os.path.join(report.path, name), model_config)
        except ValueError as exc:
            raise ValueError(f"{name} from {served.url} ({served.source}) does not load under {sizes}: {exc}") from exc
