"""``llm_checkpoint`` through Dagster Pipes (subprocess), its blocking check, ``llm_averaged``, the GPU pod spec."""

from __future__ import annotations

import os
import shutil
import sys

import dagster as dg
import pytest
import torch

from assets.training import TrainConfig, llm_averaged, llm_checkpoint, train_command, training_pod_spec
from pipelines.resources import DataStore, TrainingResource

from .conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def data_root(training_list, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    shutil.copy(training_list, root / "train.data.list")
    shutil.copy(training_list, root / "cv.data.list")
    return str(root)


def resources(data_root, model_dir, qwen_dir):
    return {"store": DataStore(root=data_root),
            "training": TrainingResource(model_dir=str(model_dir), recipe=TINY_RECIPE, qwen_pretrain_path=qwen_dir,
                                         python=sys.executable)}


def run_config(**train):
    return dg.RunConfig(ops={"llm_checkpoint": TrainConfig(use_amp=False, num_workers=0, **train)})


def test_training_asset_streams_progress_and_gates_on_the_cv_loss(data_root, qwen_dir, tmp_path):
    with dg.DagsterInstance.ephemeral() as instance:
        good = dg.materialize([llm_checkpoint], instance=instance, resources=resources(data_root, tmp_path / "a", qwen_dir),
                              run_config=run_config(max_epoch=3))
        assert good.success
        meta = good.asset_materializations_for_node("llm_checkpoint")[0].metadata
        assert meta["steps"].value == 6 and meta["cv_loss"].value > 0
        assert meta["loss_curve"].value.startswith("![LLM loss](data:image/png;base64,")
        assert meta["last_tokens_per_s"].value > 0
        checks = good.get_asset_check_evaluations()
        assert [(c.check_name, c.passed) for c in checks] == [("cv_loss_finite_and_not_worse", True)]
        assert os.path.exists(tmp_path / "a" / "epoch_2_whole.pt")

        # a worse model (one epoch from scratch) must not pass the blocking check
        worse = dg.materialize([llm_checkpoint], instance=instance, resources=resources(data_root, tmp_path / "b", qwen_dir),
                               run_config=run_config(max_epoch=1), raise_on_error=False)
        evaluation = worse.get_asset_check_evaluations()[0]
        assert not evaluation.passed
        assert evaluation.metadata["previous_cv_loss"].value == pytest.approx(meta["cv_loss"].value)

        averaged = dg.materialize([llm_averaged], instance=instance, resources=resources(data_root, tmp_path / "a", qwen_dir),
                                  run_config=dg.RunConfig(ops={"llm_averaged": {"config": {"num": 2}}}))
        assert averaged.success
    sd = torch.load(os.path.join(data_root, "llm", "llm.pt"), weights_only=True)
    from cosyvoice.config import load_recipe, training_overrides

    load_recipe(TINY_RECIPE, training_overrides("llm"))["llm"].load_state_dict(sd, strict=True)


def test_the_gpu_training_pod_validates_and_requests_gpus():
    import kubernetes_validate
    from dagster_k8s.pipes import build_pod_body

    training = TrainingResource(model_dir="/models/llm", launcher="k8s", recipe="/app/configs/cosyvoice2.yaml",
                                deepspeed_config="/app/configs/ds_stage2.json", image="cosyvoice-pipeline-gpu:1",
                                volume_claim="cosyvoice-models")
    command = train_command(TrainConfig(gpus_per_node=8, engine="deepspeed"), training, "s3://b/train.data.list",
                            "s3://b/cv.data.list")
    assert command[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=1"]
    assert "--deepspeed_config" in command and "/app/configs/ds_stage2.json" in command
    pod = build_pod_body(pod_name="train-llm", image=training.image, command=command,
                         env_vars={"DAGSTER_PIPES_CONTEXT": "x"},
                         base_pod_meta={"labels": {"app": "cosyvoice"}},
                         base_pod_spec=training_pod_spec(8, volume_claim=training.volume_claim))
    from kubernetes.client import ApiClient

    manifest = {"apiVersion": "v1", "kind": "Pod", **ApiClient().sanitize_for_serialization(pod)}
    kubernetes_validate.validate(manifest, "1.33.0", strict=True)
    limits = manifest["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "8"
    assert manifest["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_multi_node_uses_a_static_rendezvous_with_this_node_as_rank_0():
    training = TrainingResource(model_dir="/m", python="python")
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        train_command(TrainConfig(nodes=2), training, "a", "b")
    command = train_command(TrainConfig(nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29400"), training, "a", "b")
    launcher = command[:command.index("cosyvoice.cli")]
    assert {"--rdzv_endpoint=node0:29400", "--rdzv_backend=static", "--node_rank=0", "--nnodes=2",
            "--nproc_per_node=4"} <= set(launcher)
    assert "--standalone" not in launcher
    override = train_command(TrainConfig(nodes=2), training, "a", "b", rdzv_endpoint="node-0.svc:29400")
    assert "--rdzv_endpoint=node-0.svc:29400" in override


class FakeKubernetes:
    """Records the calls WorkerNodes makes (no cluster here)."""

    def __init__(self, fail_job=False):
        self.calls, self.fail_job = [], fail_job

    def create_namespaced_service(self, namespace, body):
        self.calls.append(("create service", namespace, body["metadata"]["name"]))

    def create_namespaced_job(self, namespace, body):
        if self.fail_job:
            raise RuntimeError("quota exceeded")
        self.calls.append(("create job", namespace, body["metadata"]["name"]))

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append(("delete job", namespace, name))

    def delete_namespaced_service(self, name, namespace):
        self.calls.append(("delete service", namespace, name))


def test_multi_node_on_kubernetes_starts_workers_for_the_run_and_always_removes_them(data_root, monkeypatch):
    """llm_checkpoint with nodes: 3 on the k8s launcher: Service + Indexed Job before the Pipes pod,
    node 0's pod resolvable at the rendezvous endpoint, both deleted although the pod failed."""
    import kubernetes
    from dagster_k8s import PipesK8sClient

    fake = FakeKubernetes()
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda: fake)
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", lambda: fake)
    launched = {}

    def run(self, **kwargs):
        launched.update(kwargs, calls_before=list(fake.calls))
        raise RuntimeError("pod failed")

    monkeypatch.setattr(PipesK8sClient, "run", run)
    training = TrainingResource(model_dir="/models/llm", launcher="k8s", recipe="/app/configs/cosyvoice2.yaml",
                                image="cosyvoice-pipeline-gpu:1", namespace="cosyvoice", volume_claim="models")
    result = dg.materialize([llm_checkpoint], resources={"store": DataStore(root=data_root), "training": training},
                            run_config=dg.RunConfig(ops={"llm_checkpoint": TrainConfig(nodes=3, gpus_per_node=8)}),
                            raise_on_error=False)
    assert not result.success
    name = f"cv-train-{result.run_id.replace('-', '')[:12]}"
    assert launched["calls_before"] == [("create service", "cosyvoice", name), ("create job", "cosyvoice", name)]
    assert fake.calls[2:] == [("delete job", "cosyvoice", name), ("delete service", "cosyvoice", name)]
    assert launched["namespace"] == "cosyvoice"
    assert launched["base_pod_spec"]["hostname"] == "node-0" and launched["base_pod_spec"]["subdomain"] == name
    assert f"--rdzv_endpoint=node-0.{name}:29400" in launched["command"]
    assert "--node_rank=0" in launched["command"] and "--nnodes=3" in launched["command"]


def test_worker_nodes_clean_up_the_service_when_the_job_cannot_be_created():
    from pipelines.multinode import MultiNodeLayout, WorkerNodes

    fake = FakeKubernetes(fail_job=True)
    layout = MultiNodeLayout("cv-train-x", 2, "ns")
    with pytest.raises(RuntimeError, match="quota"):
        with WorkerNodes(layout, {}, core_api=fake, batch_api=fake):
            pass
    assert fake.calls == [("create service", "ns", "cv-train-x"), ("delete service", "ns", "cv-train-x")]
