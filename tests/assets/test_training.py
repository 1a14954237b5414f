"""``llm_checkpoint`` through Dagster Pipes (subprocess), its blocking check, ``llm_averaged``, the GPU pod spec;
the launcher is a resource, injected here as the deployments do."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import ClassVar

import dagster as dg
import pytest
import torch

from assets.training import LlmTrainConfig, TrainConfig, llm_averaged, llm_checkpoint, train_options
from pipelines.k8s import training_pod_spec
from pipelines.launchers import K8sLauncher, Launcher, SubprocessLauncher
from pipelines.resources import DataStore, TrainingResource
from tests.train.conftest import TINY_RECIPE


def resources(data_root, model_dir, qwen_dir):
    return {"store": DataStore(root=data_root),
            "training": TrainingResource(model_dir=str(model_dir), recipe=TINY_RECIPE, qwen_pretrain_path=qwen_dir),
            "train_launcher": SubprocessLauncher(python=sys.executable)}


def run_config(**train):
    return dg.RunConfig(ops={"llm_checkpoint": TrainConfig(use_amp=False, num_workers=0, **train)})


def checkpoints_of(run_dir) -> list[str]:
    return sorted(f for f in os.listdir(run_dir) if f.startswith("epoch_") and f.endswith(".pt")
                  and not f.endswith(".state.pt"))


def test_each_run_writes_its_own_dir_and_llm_averaged_averages_only_the_released_runs_checkpoints(
        data_root, qwen_dir, tmp_path):
    """Three real training runs on one instance: good (2 epochs), a resume of it from its first
    epoch (a second dir holding only epoch 1; released), a worse run (rejected by the gate). The
    good run's two epochs stay on disk, yet llm_averaged averages only the released run's one."""
    models = tmp_path / "models"
    res = resources(data_root, models, qwen_dir)

    def train(raise_on_error=True, **config):
        result = dg.materialize([llm_checkpoint], instance=instance, resources=res, run_config=run_config(**config),
                                raise_on_error=raise_on_error)
        (evaluation,) = result.get_asset_check_evaluations()
        assert evaluation.check_name == "cv_loss_finite_and_not_worse"
        return result, result.asset_materializations_for_node("llm_checkpoint")[0].metadata, evaluation

    def average():
        result = dg.materialize([llm_averaged], instance=instance, resources=res,
                                run_config=dg.RunConfig(ops={"llm_averaged": {"config": {"num": 5}}}))
        return result.asset_materializations_for_node("llm_averaged")[0].metadata

    with dg.DagsterInstance.ephemeral() as instance:
        good, meta1, check1 = train(max_epoch=2)
        dir1 = models / good.run_id
        assert meta1["run_dir"].value == str(dir1) and checkpoints_of(dir1) == ["epoch_0_whole.pt", "epoch_1_whole.pt"]
        assert meta1["steps"].value == 4 and meta1["cv_loss"].value > 0
        assert meta1["loss_curve"].value.startswith("![LLM loss](data:image/png;base64,")
        assert meta1["last_tokens_per_s"].value > 0
        sha = hashlib.sha256(open(os.path.join(data_root, "cv.data.list"), "rb").read()).hexdigest()
        assert meta1["cv_list_sha256"].value == sha and check1.passed

        resumed, meta2, check2 = train(max_epoch=2, resume_from=str(dir1 / "epoch_0_whole.pt"), cv_tolerance=0.01)
        dir2 = models / resumed.run_id
        assert meta2["run_dir"].value == str(dir2) and checkpoints_of(dir2) == ["epoch_1_whole.pt"]
        assert checkpoints_of(dir1) == ["epoch_0_whole.pt", "epoch_1_whole.pt"]
        assert check2.passed and meta2["cv_loss"].value == pytest.approx(meta1["cv_loss"].value, rel=0.01)
        assert check2.metadata["baseline_run_id"].value == good.run_id

        worse, meta3, check3 = train(max_epoch=1, raise_on_error=False)
        assert not worse.success and not check3.passed
        assert check3.metadata["baseline_run_id"].value == resumed.run_id
        assert check3.metadata["baseline_cv_loss"].value == pytest.approx(meta2["cv_loss"].value)

        averaged = average()  # the latest llm_checkpoint was rejected: the released run is averaged, alone
        assert averaged["llm_checkpoint_run_id"].value == resumed.run_id and averaged["run_dir"].value == str(dir2)
        assert averaged["sources"].value == ["epoch_1_whole.pt"] and averaged["averaged"].value == 1
    sd = torch.load(os.path.join(data_root, "llm", "llm.pt"), weights_only=True)
    from cosyvoice.config import load_recipe, training_overrides

    load_recipe(TINY_RECIPE, training_overrides("llm"))["llm"].load_state_dict(sd, strict=True)


class CannedInvocation:
    def __init__(self, cv_loss: float):
        self.cv_loss = cv_loss

    def get_custom_messages(self):
        return []

    def get_materialize_result(self):
        return dg.MaterializeResult(metadata={"cv_loss": dg.MetadataValue.float(self.cv_loss),
                                              "steps": dg.MetadataValue.int(1)})


class CannedLauncher(Launcher):
    """The train_launcher resource of this test: records what the asset launches and, instead of a
    trainer, reports the CV loss it is told (``CannedLauncher.cv_loss``)."""

    cv_loss: ClassVar[float | None] = None
    launched: ClassVar[list[dict]] = []

    def launch(self, context, cli_args, *, gpus_per_node=1, nodes=1, rdzv_endpoint=""):
        CannedLauncher.launched.append({"cli_args": list(cli_args), "gpus_per_node": gpus_per_node, "nodes": nodes,
                                        "rdzv_endpoint": rdzv_endpoint})
        return CannedInvocation(CannedLauncher.cv_loss)


def test_the_cv_gate_compares_with_the_last_passed_run_on_the_same_cv_list(tmp_path, monkeypatch):
    """good (released), worse (rejected), better than the rejected one but worse than the good one
    (still rejected: a rejected run is never the baseline); then a changed cv.data.list resets the
    baseline and the check says so; the real llm_checkpoint and its check on a real instance."""
    monkeypatch.setattr(CannedLauncher, "launched", [])
    (tmp_path / "train.data.list").write_text("a.tar\n")
    (tmp_path / "cv.data.list").write_text("cv-1.tar\ncv-2.tar\n")
    res = {"store": DataStore(root=str(tmp_path)), "training": TrainingResource(model_dir=str(tmp_path / "m")),
           "train_launcher": CannedLauncher()}

    def gate(cv_loss):
        monkeypatch.setattr(CannedLauncher, "cv_loss", cv_loss)
        result = dg.materialize([llm_checkpoint], instance=instance, resources=res, raise_on_error=False)
        (evaluation,) = result.get_asset_check_evaluations()
        return result.run_id, evaluation

    with dg.DagsterInstance.ephemeral() as instance:
        good, first = gate(2.0)
        assert first.passed and "first baseline" in first.description
        _, worse = gate(3.0)
        assert not worse.passed and worse.metadata["baseline_run_id"].value == good
        _, between = gate(2.5)
        assert not between.passed, "the rejected run (3.0) became the baseline"
        assert between.metadata["baseline_cv_loss"].value == 2.0 and "worse than the released 2" in between.description
        better, improved = gate(1.5)
        assert improved.passed and improved.metadata["baseline_run_id"].value == good
        _, nan = gate(float("nan"))
        assert not nan.passed and "not finite" in nan.description

        (tmp_path / "cv.data.list").write_text("cv-1.tar\n")  # a changed CV set
        _, reset = gate(9.0)
        assert reset.passed and reset.metadata["baseline_reset"].value
        assert "CV list changed" in reset.description and better in reset.description
        assert math.isnan(reset.metadata["baseline_cv_loss"].value)
        _, after = gate(9.5)  # the reset run is the new baseline, on the new list
        assert not after.passed and after.metadata["baseline_cv_loss"].value == 9.0


def test_the_asset_launches_the_options_argv_with_the_run_configs_topology(tmp_path, monkeypatch):
    """What llm_checkpoint hands its launcher: the trainer argv of TrainOptions (parsed back by the
    real CLI parser: this run's dir, the deepspeed config for the deepspeed engine), the extra
    arguments after it, and the run config's node/GPU/rendezvous settings."""
    from cosyvoice.cli import build_parser
    from cosyvoice.train.options import TrainOptions

    monkeypatch.setattr(CannedLauncher, "launched", [])
    monkeypatch.setattr(CannedLauncher, "cv_loss", 1.0)
    (tmp_path / "train.data.list").write_text("a.tar\n")
    (tmp_path / "cv.data.list").write_text("cv.tar\n")
    training = TrainingResource(model_dir=str(tmp_path / "m"), deepspeed_config="/cfg/ds.json")
    config = LlmTrainConfig(engine="deepspeed", nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29400",
                            batch_type="token", max_tokens_in_batch=2048, extra_args=["--log_interval", "1"])
    result = dg.materialize([llm_checkpoint], resources={"store": DataStore(root=str(tmp_path)), "training": training,
                                                         "train_launcher": CannedLauncher()},
                            run_config=dg.RunConfig(ops={"llm_checkpoint": config}))
    (launched,) = CannedLauncher.launched
    assert {k: launched[k] for k in ("gpus_per_node", "nodes", "rdzv_endpoint")} == {
        "gpus_per_node": 4, "nodes": 2, "rdzv_endpoint": "node0:29400"}
    assert launched["cli_args"][-2:] == ["--log_interval", "1"]
    options = TrainOptions.from_args(build_parser().parse_args(launched["cli_args"][:-2]))
    assert options.model_dir == str(tmp_path / "m" / result.run_id) and options.train_engine == "deepspeed"
    assert options.deepspeed_config == "/cfg/ds.json" and options.batch_type == "token"
    assert (options.train_data, options.cv_data) == (str(tmp_path / "train.data.list"), str(tmp_path / "cv.data.list"))
    assert options.tensorboard_dir == str(tmp_path / "m" / result.run_id / "tensorboard")
    meta = result.asset_materializations_for_node("llm_checkpoint")[0].metadata
    assert meta["engine"].value == "deepspeed" and meta["gpus"].value == 8


def test_the_gpu_training_pod_validates_and_requests_gpus():
    import kubernetes_validate
    from dagster_k8s.pipes import build_pod_body

    training = TrainingResource(model_dir="/models/llm", recipe="/app/configs/cosyvoice2.yaml",
                                deepspeed_config="/app/configs/ds_stage2.json")
    launcher = K8sLauncher(image="cosyvoice-pipeline-gpu:1", volume_claim="cosyvoice-models")
    options = train_options(TrainConfig(gpus_per_node=8, engine="deepspeed"), training, "0123-abcd",
                            "s3://b/train.data.list", "s3://b/cv.data.list")
    command = launcher.command(options.to_argv(), gpus_per_node=8)
    assert command[command.index("--model_dir") + 1] == "/models/llm/0123-abcd"
    assert command[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=1"]
    assert "--deepspeed_config" in command and "/app/configs/ds_stage2.json" in command
    pod = build_pod_body(pod_name="train-llm", image=launcher.image, command=command,
                         env_vars={"DAGSTER_PIPES_CONTEXT": "x"},
                         base_pod_meta={"labels": {"app": "cosyvoice"}},
                         base_pod_spec=training_pod_spec(8, volume_claim=launcher.volume_claim))
    from kubernetes.client import ApiClient

    manifest = {"apiVersion": "v1", "kind": "Pod", **ApiClient().sanitize_for_serialization(pod)}
    kubernetes_validate.validate(manifest, "1.33.0", strict=True)
    limits = manifest["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "8"
    assert manifest["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert launcher.pod_spec(8) == training_pod_spec(8, volume_claim="cosyvoice-models", credentials_secret="cosyvoice-s3")


def test_multi_node_uses_a_static_rendezvous_with_this_node_as_rank_0():
    launcher = SubprocessLauncher(python="python")
    args = train_options(TrainConfig(nodes=2), TrainingResource(model_dir="/m"), "r", "a", "b").to_argv()
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launcher.command(args, nodes=2)
    command = launcher.command(args, nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29400")
    launcher_args = command[:command.index("cosyvoice.cli")]
    assert {"--rdzv_endpoint=node0:29400", "--rdzv_backend=static", "--node_rank=0", "--nnodes=2",
            "--nproc_per_node=4"} <= set(launcher_args)
    assert "--standalone" not in launcher_args
    override = launcher.command(args, nodes=2, rdzv_endpoint="node-0.svc:29400")
    assert "--rdzv_endpoint=node-0.svc:29400" in override


def test_multi_node_on_kubernetes_starts_workers_for_the_run_and_always_removes_them(data_root, monkeypatch,
                                                                                     fake_kubernetes):
    """llm_checkpoint with nodes: 3 on the k8s launcher: Service + Indexed Job before the Pipes pod,
    node 0's pod resolvable at the rendezvous endpoint, both deleted although the pod failed."""
    from dagster_k8s import PipesK8sClient

    fake = fake_kubernetes
    launched = {}

    def run(self, **kwargs):
        launched.update(kwargs, calls_before=list(fake.calls))
        raise RuntimeError("pod failed")

    monkeypatch.setattr(PipesK8sClient, "run", run)
    training = TrainingResource(model_dir="/models/llm", recipe="configs/cosyvoice2.yaml")  # read for its family
    launcher = K8sLauncher(image="cosyvoice-pipeline-gpu:1", namespace="cosyvoice", volume_claim="models")
    result = dg.materialize([llm_checkpoint], resources={"store": DataStore(root=data_root), "training": training,
                                                         "train_launcher": launcher},
                            run_config=dg.RunConfig(ops={"llm_checkpoint": TrainConfig(nodes=3, gpus_per_node=8)}),
                            raise_on_error=False)
    assert not result.success
    name = f"cv-train-llm-{result.run_id.replace('-', '')[:12]}"  # one name per run and model
    from pipelines.multinode import run_resource_name

    assert len({run_resource_name(result.run_id, m) for m in ("llm", "flow", "hifigan")}) == 3
    assert launched["calls_before"] == [("create service", "cosyvoice", name), ("create job", "cosyvoice", name)]
    assert fake.calls[2:] == [("delete job", "cosyvoice", name), ("delete service", "cosyvoice", name)]
    assert launched["namespace"] == "cosyvoice"
    assert launched["base_pod_spec"]["hostname"] == "node-0" and launched["base_pod_spec"]["subdomain"] == name
    assert f"--rdzv_endpoint=node-0.{name}:29400" in launched["command"]
    assert "--node_rank=0" in launched["command"] and "--nnodes=3" in launched["command"]


def test_worker_nodes_clean_up_the_service_when_the_job_cannot_be_created():
    from pipelines.multinode import MultiNodeLayout, WorkerNodes
    from tests.support.fake_k8s import FakeKubernetes

    fake = FakeKubernetes(fail_job=True)
    layout = MultiNodeLayout("cv-train-x", 2, "ns")
    with pytest.raises(RuntimeError, match="quota"):
        with WorkerNodes(layout, {}, core_api=fake, batch_api=fake):
            pass
    assert fake.calls == [("create service", "ns", "cv-train-x"), ("delete service", "ns", "cv-train-x")]
