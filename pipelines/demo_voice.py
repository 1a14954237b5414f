"""Train the tiny recipes end to end on the CPU, publish a repository whose every trained weight file
this pipeline produced, and speak one sentence with it (``make demo-voice``, after ``make demo``).

On the local instance (``$DAGSTER_HOME``, so ``make ui`` shows the runs), from the training lists
``pipelines.demo`` left: ``retrain``'s assets (the LLM, the flow and the HiFT vocoder with its GAN,
a few optimizer steps each from random weights with ``configs/cosyvoice2-tiny.yaml``, and their
averages), the HF export of the LLM, and ``triton_model_repo`` with ``acoustic_source: pipeline``
(the CPU channel: the HF LLM on the python backend). The published version is then pulled as a
deployment pulls it and ``synthesize`` (the ``cosyvoice-pipeline synthesize`` face) speaks one
sentence with its LLM, flow and HiFT, prompted with a corpus utterance.

Not trained here: the front-end ONNX models (CAM++ and the S3 speech tokenizer; upstream does not
train them either), which come from the models resource. A voice a few steps old says nothing
intelligible: the point is that every stage runs and hands the next one files it loads strictly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass

import dagster as dg

from assets.export import hf_checkpoint
from assets.serving import triton_model_repo
from assets.training import (
    AverageConfig,
    LlmTrainConfig,
    TrainConfig,
    flow_averaged,
    flow_checkpoint,
    hift_averaged,
    hift_checkpoint,
    llm_averaged,
    llm_checkpoint,
)
from cosyvoice import storage
from cosyvoice.acoustic.synthesis import SynthesisReport, synthesize
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.triton.publish import BUNDLE_DIRS, pull
from pipelines.resources import TrainingResource, resources_for

TINY_RECIPE = "configs/cosyvoice2-tiny.yaml"
SENTENCE = "Every weight of this voice was trained by the pipeline."
#: the cap on the LLM's speech tokens (3 s): a barely trained LLM rarely stops by itself
MAX_NEW_TOKENS = 75
#: what the demo materializes, in graph order
VOICE_ASSETS = (llm_checkpoint, llm_averaged, hf_checkpoint, flow_checkpoint, flow_averaged, hift_checkpoint,
                hift_averaged, triton_model_repo)


@dataclass
class VoiceDemoReport:
    """The published version (``repo``/``version``, pulled into ``served``), the acoustic files it
    serves (``acoustic_files``: source, path, sha256) and the sentence spoken into ``synthesis.out``."""

    repo: str
    version: int
    load_test: str
    served: str
    acoustic_files: dict
    prompt: tuple[str, str]
    synthesis: SynthesisReport


def run_config(*, steps: int, load_test: str) -> dg.RunConfig:
    """``steps`` optimizer steps per model on the CPU (fp32, no loader workers; as many epochs as
    steps, so a small train list gets there too); the CV gates tolerate any finite loss (every demo
    run starts from random weights, so comparing with the previous demo's is not a quality
    judgement); the repository takes the pipeline's acoustic models."""
    train = dict(max_epoch=steps, max_steps=steps, use_amp=False, num_workers=0, cv_tolerance=1e9,
                 extra_args=["--log_interval", "1"])
    ops = {"llm_checkpoint": LlmTrainConfig(**train), "flow_checkpoint": TrainConfig(**train),
           "hift_checkpoint": TrainConfig(**train)}
    ops.update({a.key.to_user_string(): AverageConfig() for a in (llm_averaged, flow_averaged, hift_averaged)})
    ops["triton_model_repo"] = {"config": {"acoustic_source": "pipeline", "llm_backend": "python",
                                           "load_test": load_test, "bls_instances": 1}}
    return dg.RunConfig(ops=ops)


def demo_resources(recipe: str = TINY_RECIPE) -> dict:
    """The embedded deployment's resources with the training recipe replaced by ``recipe``."""
    resources = resources_for("embedded")
    base = resources["training"]
    resources["training"] = TrainingResource(
        model_dir=base.model_dir, flow_model_dir=base.flow_model_dir, hift_model_dir=base.hift_model_dir,
        recipe=recipe, qwen_pretrain_path=base.qwen_pretrain_path, bundled_tokenizer=True)
    return resources


def default_load_test() -> str:
    """``auto`` (a real server load test) where ``make triton-server`` built the CPU tritonserver,
    else ``skip`` (published on purpose without one; the check says so)."""
    from cosyvoice.triton.server import server_env

    try:
        server_env()
    except Exception:  # noqa: BLE001 - no environment here, whatever the reason
        return "skip"
    return "auto"


def train_and_publish(instance: dg.DagsterInstance, resources: dict, *, steps: int = 2,
                      load_test: str = "skip") -> dict:
    """Materialize :data:`VOICE_ASSETS` in one run; the metadata of ``triton_model_repo``."""
    result = dg.materialize(list(VOICE_ASSETS), instance=instance, resources=resources,
                            run_config=run_config(steps=steps, load_test=load_test), raise_on_error=False)
    for event in result.get_asset_materialization_events():
        print(f"materialized {event.asset_key.to_user_string()}")
    failed = [f"{e.asset_key.to_user_string()}:{e.check_name}" for e in result.get_asset_check_evaluations()
              if not e.passed]
    if not result.success or failed:
        raise SystemExit(f"the voice demo run {result.run_id} failed (failed checks: {failed or 'none'}); see `make ui`")
    (published,) = result.asset_materializations_for_node("triton_model_repo")
    return {k: v.value for k, v in published.metadata.items()}


def prompt_utterance(manifest_dir: str) -> tuple[str, str]:
    """(wav, transcript) of the first utterance of a manifest: the voice the sentence is spoken in."""
    wavs, texts = read_table(manifest_dir, "wav.scp"), read_table(manifest_dir, "text", joined=True)
    utt = sorted(wavs)[0]
    return wavs[utt], texts[utt]


def speak(repo_root: str, served: str, out: str, prompt: tuple[str, str], *,
          sentence: str = SENTENCE) -> tuple[int, SynthesisReport]:
    """Pull the CPU channel's published version into ``served`` and speak ``sentence`` with it."""
    version = pull(repo_root, served, channel="cpu")
    report = synthesize(os.path.join(served, BUNDLE_DIRS["model_dir"]), out, text=sentence,
                        llm_dir=os.path.join(served, BUNDLE_DIRS["hf_dir"]), prompt_wav=prompt[0],
                        prompt_text=prompt[1], max_new_tokens=MAX_NEW_TOKENS)
    return version, report


def run(instance: dg.DagsterInstance, resources: dict, out_dir: str, *, steps: int = 2, load_test: str = "skip",
        sentence: str = SENTENCE, subset: str = "dev-clean") -> VoiceDemoReport:
    """Train, publish, pull and speak; ``out_dir`` receives ``served/`` and ``voice.wav``."""
    meta = train_and_publish(instance, resources, steps=steps, load_test=load_test)
    with dg.build_resources({"store": resources["store"]}) as built:
        layout = built.store.layout
    repo = layout.triton_root("cosyvoice2")
    served, prompt = os.path.join(out_dir, "served"), prompt_utterance(layout.manifest_dir(subset))
    version, report = speak(repo, served, os.path.join(out_dir, "voice.wav"), prompt, sentence=sentence)
    return VoiceDemoReport(repo, version, meta["load_test"], served, meta["acoustic_files"], prompt, report)


def main(argv: list[str] | None = None) -> VoiceDemoReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("COSYVOICE_DATA_ROOT", "data"), "demo"),
                        help="where the pulled repository (served/) and voice.wav go")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per model")
    parser.add_argument("--recipe", default=TINY_RECIPE)
    parser.add_argument("--load-test", choices=["auto", "skip"], default=None,
                        help="default: auto where the CPU tritonserver is built (make triton-server), else skip")
    parser.add_argument("--sentence", default=SENTENCE)
    args = parser.parse_args(argv)
    if not storage.is_local(args.out):
        raise SystemExit(f"--out {args.out}: the demo writes a local folder")
    with dg.DagsterInstance.get() as instance:
        report = run(instance, demo_resources(args.recipe), args.out, steps=args.steps,
                     load_test=args.load_test or default_load_test(), sentence=args.sentence)
    served = {key: os.path.join(report.served, folder) for key, folder in BUNDLE_DIRS.items()}
    print(f"published {report.repo}/{report.version} (CPU channel, server load test {report.load_test}); acoustic files: "
          + ", ".join(f"{n} from {f['source']} ({f['sha256'][:12]})" for n, f in report.acoustic_files.items()))
    command = [os.path.join(os.path.dirname(sys.executable), "cosyvoice-pipeline"), "synthesize", "--model_dir", served["model_dir"], "--llm_dir", served["hf_dir"],
               "--text", args.sentence, "--prompt_wav", report.prompt[0], "--prompt_text", report.prompt[1],
               "--max_new_tokens", str(MAX_NEW_TOKENS), "--out", report.synthesis.out]
    print(f"spoke {report.synthesis.audio_seconds:.2f} s -> {report.synthesis.out}; the same with the CLI:\n  "
          + shlex.join(command))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
