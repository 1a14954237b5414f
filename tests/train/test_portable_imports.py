"""The GPU benchmark machine has torch and transformers but not our other dependencies (and no
internet), so the training code must import without Dagster, the audio stack or the export stack,
and ``bench/train.py`` with nothing but torch and transformers."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_ON_THE_GPU_IMAGE = ("dagster", "dagster_pipes", "dagster_k8s", "whisper", "onnxruntime", "s3tokenizer", "onnx",
                        "torchaudio", "soundfile", "deepspeed", "tritonclient", "kubernetes")


def run_without(modules, code):
    """Runs ``code`` with ``modules`` made unimportable (as if not installed; find_spec sees None)."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True)


def test_trainer_and_dataset_import_without_dagster_and_the_audio_stack():
    out = run_without(NOT_ON_THE_GPU_IMAGE, "import cosyvoice.train.trainer, cosyvoice.train.cli, "
                                            "cosyvoice.dataset.pipeline, cosyvoice.llm; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_training_benchmark_needs_only_torch_and_transformers():
    extra = ("fsspec", "s3fs", "pyarrow", "hyperpyyaml", "rich", "matplotlib")  # tqdm, yaml: transformers needs them
    out = run_without(NOT_ON_THE_GPU_IMAGE + extra,
                      "import runpy; sys.argv = ['bench/train.py', '--help']\n"
                      "try:\n    runpy.run_path('bench/train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n")
    assert out.returncode == 0 and "--tokens" in out.stdout, out.stderr[-2000:]


def test_the_guard_is_real():
    out = run_without(("dagster",), "import pipelines.definitions")
    assert out.returncode != 0 and "dagster" in out.stderr
