"""`kubetune render-serve`: the KServe InferenceService of a pushed model, for every recipe,
against the kserve SDK's models and KServe's documented rules (tests/kserve_api.py); GPUs and
memory from `kubetune plan`'s inference estimate."""

from __future__ import annotations

import pytest
import yaml

from .conftest import RECIPES, TINY_DEMO, assert_user_error, run_cli
from .kserve_api import kserve_errors

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
URI = "s3://models/kubetune/run-1/"


def rendered(recipe, *sets: str) -> dict:
    from kubetune.components.config import load_recipe
    from kubetune.components.serve.render import render_inference_service

    return render_inference_service(load_recipe(recipe, list(sets)), URI)


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_recipe_renders_a_valid_inference_service(recipe):
    from kubetune.components.config import load_recipe
    from kubetune.components.planner.plan import inference_plan

    cfg = load_recipe(recipe, [])
    isvc = rendered(recipe)
    assert kserve_errors(isvc) == []
    plan = inference_plan(cfg)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["storageUri"] == URI.rstrip("/") and model["modelFormat"] == {
        "name": "huggingface"
    }
    assert predictor["serviceAccountName"] == "kubetune-serve"
    assert isvc["metadata"]["namespace"] == cfg.kubernetes.namespace
    limits = model["resources"]["limits"]
    assert limits["memory"] == plan.memory
    # bf16 weights +30% over the GPU's memory, rounded up to a tensor-parallel size: 7B (14
    # GB) on one 80 GB GPU, 40B (83 GB) on two, 180B (357 GB: 6 needed) on 8
    expected = {"falcon-7b-qlora": 1, "falcon-40b-qlora": 2, "falcon-180b-lora-zero3": 8}
    assert plan.gpus == expected.get(recipe.stem, plan.gpus)
    assert plan.gpus == (0 if cfg.hardware.gpu == "none" else plan.gpus)
    if plan.gpus:
        assert limits["nvidia.com/gpu"] == str(plan.gpus)
        assert "--backend=vllm" in model["args"]
        assert f"--tensor-parallel-size={plan.gpus}" in model["args"]
        assert predictor["nodeSelector"] == cfg.kubernetes.node_selector
        assert predictor["tolerations"] == cfg.kubernetes.tolerations
    else:
        assert "nvidia.com/gpu" not in limits and "--backend=huggingface" in model["args"]


# The stock kserve-huggingfaceserver ClusterServingRuntime's container resources
# (kserve/kserve config/runtimes/kserve-huggingfaceserver.yaml).
RUNTIME_RESOURCES = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "1", "memory": "2Gi"},
}


def merged_resources(runtime: dict, predictor: dict) -> dict:
    """The pod container's resources as KServe builds them: the runtime's container merged with
    the predictor's by a strategic merge patch, maps key by key, the predictor's value winning
    (kserve/kserve pkg/utils/container_merge.go, MergeRuntimeContainers)."""
    return {
        part: {**runtime.get(part, {}), **predictor.get(part, {})}
        for part in ("requests", "limits")
    }


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
@pytest.mark.parametrize("sets", [(), ("serve.cpu=12",), ("hardware.gpu=none",)])
def test_the_predictor_pod_kserve_builds_is_one_the_api_server_admits(recipe, sets):
    """Request <= limit for cpu and memory, GPU request = limit, in the container KServe makes
    of the rendered predictor and the stock runtime (the pod's validation in the API server:
    k8s.io/kubernetes pkg/apis/core/validation, ValidateResourceRequirements)."""
    from kubetune.components.k8s_values import quantity_value

    if "hardware.gpu=none" in sets and "180b" in recipe.stem:
        pytest.skip("a 180B model is not served on CPUs")
    model = rendered(recipe, *sets)["spec"]["predictor"]["model"]
    pod = merged_resources(RUNTIME_RESOURCES, model["resources"])
    for resource in ("cpu", "memory"):
        request, limit = pod["requests"][resource], pod["limits"][resource]
        assert quantity_value(request) <= quantity_value(limit), (resource, request, limit)
    gpu = {part: pod[part].get("nvidia.com/gpu") for part in ("requests", "limits")}
    assert gpu["requests"] == gpu["limits"]


def test_the_merge_would_refuse_a_cpu_request_above_the_runtimes_limit():
    """What every InferenceService did before: requests.cpu 4 and no cpu limit."""
    from kubetune.components.k8s_values import quantity_value

    pod = merged_resources(RUNTIME_RESOURCES, {"requests": {"cpu": "4", "memory": "8Gi"}})
    assert quantity_value(pod["requests"]["cpu"]) > quantity_value(pod["limits"]["cpu"])


@pytest.mark.integration
def test_render_serve_cli():
    result = run_cli(
        "render-serve",
        RECIPES / "falcon-7b-qlora.yaml",
        "--uri",
        URI,
        "--name",
        "falcon-chat",
        "--set",
        "serve.max_model_len=4096",
        "--set",
        "serve.gpus=2",
        "--set",
        "serve.max_replicas=3",
    )
    assert result.code == 0, result
    isvc = yaml.safe_load(result.out)
    assert kserve_errors(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["metadata"]["name"] == "falcon-chat" and "--model_name=falcon-chat" in model["args"]
    assert "--max-model-len=4096" in model["args"] and "--tensor-parallel-size=2" in model["args"]
    assert isvc["spec"]["predictor"]["maxReplicas"] == 3
    plan = run_cli("plan", RECIPES / "falcon-40b-qlora.yaml")
    assert "serving (render-serve): 2 x A100-80GB, 93Gi memory per replica" in plan.out, plan


@pytest.mark.integration
def test_render_serve_errors_are_clear():
    from kubetune.components.errors import UserError

    def serve(*args):
        return run_cli("render-serve", TINY_DEMO, *args)

    assert_user_error(serve("--uri", "/local/folder"), "--uri /local/folder", "s3://")
    assert_user_error(serve("--uri", URI, "--name", "9lives"), "--name", "DNS-1035")
    assert_user_error(
        serve("--uri", URI, "--set", "serve.backend=vllm"), "serve.backend=vllm needs GPUs"
    )
    assert_user_error(
        serve("--uri", URI, "--set", "serve.min_replicas=2", "--set", "serve.max_replicas=1"),
        "serve.max_replicas=1 is less than serve.min_replicas=2",
    )
    with pytest.raises(UserError, match="needs 20 GPUs .* at most 8"):  # 357 GB on 24 GB GPUs
        rendered(RECIPES / "falcon-180b-lora-zero3.yaml", "hardware.gpu=A10G-24GB")


def test_the_checks_refuse_what_kserve_refuses():
    isvc = rendered(RECIPES / "falcon-7b-qlora.yaml")
    isvc["spec"]["predictor"]["model"]["storageUri"] = "/mnt/models"
    isvc["spec"]["predictor"]["model"]["resources"]["requests"]["nvidia.com/gpu"] = "2"
    isvc["spec"]["predictor"]["huggingface"] = {"storageUri": URI}
    isvc["spec"]["predictor"]["modelFormats"] = ["huggingface"]  # not a field
    errors = "\n".join(kserve_errors(isvc))
    for expected in (
        "storageUri '/mnt/models'",
        "request must equal its limit",
        "exactly one model",
        "modelFormats: not in the API (dropped)",
    ):
        assert expected in errors, errors


def test_the_serving_account_holds_the_s3_credentials_kserve_reads():
    """The predictor's ServiceAccount (manifests/base) lists the S3 Secret, whose example has the
    keys and annotations KServe's storage initializer reads."""
    from .conftest import REPO

    accounts = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((REPO / "manifests/base/serviceaccounts.yaml").read_text())
    }
    from kubetune.components.config import ServeConfig

    account = accounts[ServeConfig().service_account]
    assert account["secrets"] == [{"name": "kubetune-s3"}]
    secret = yaml.safe_load((REPO / "manifests/base/s3-secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == "kubetune-s3"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert {
        "serving.kserve.io/s3-endpoint",
        "serving.kserve.io/s3-usehttps",
        "serving.kserve.io/s3-region",
    } <= set(secret["metadata"]["annotations"])


# --- kubetune deploy (and the pipeline's deploy step) ------------------------------------------


@pytest.fixture
def kserve(tmp_path):
    from .chat_server import ChatServer
    from .test_kubernetes import fake_kube

    gen = fake_kube(tmp_path, "inferenceservice")
    kube = next(gen)
    kube.env["KUBETUNE_SERVE_POLL"] = "0.1"
    chat = ChatServer()
    yield kube, chat
    chat.close()
    for _ in gen:
        pass


def becomes_ready(kube, chat, after: float = 0.5):
    """What KServe does once the predictor is up: a URL in the status, then Ready."""
    import threading
    import time

    def run():
        deadline = time.monotonic() + 30
        while not kube.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(after)
        (name,) = kube.jobs
        with kube.cond:
            kube.jobs[name].setdefault("status", {})["url"] = chat.url
        kube.set_condition(name, "Ready", "", "")

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.integration
def test_deploy_applies_waits_until_ready_and_asks(kserve):
    kube, chat = kserve
    becomes_ready(kube, chat)
    args = ("deploy", TINY_DEMO, "--uri", URI, "--set", "serve.prompt=What do you do?")
    result = run_cli(*args, env=kube.env)
    assert result.code == 0, result
    assert kube.invalid == [] and kube.count("POST") == 1  # checked with the kserve SDK's models
    name = "kt-falcon-lora"
    assert f"created InferenceService kubeflow/{name}" in result.out
    assert "not ready (no Ready condition yet)" in result.out
    assert f"is Ready at {chat.url}" in result.out
    assert "A: I summarize dialogues in one sentence." in result.out
    ((path, body),) = chat.requests
    assert body["model"] == name and body["messages"] == [
        {"role": "user", "content": "What do you do?"}
    ]
    # again: the same InferenceService gets the new spec (a new model), not a second one
    chat.requests.clear()
    again = run_cli(*args, "--set", "serve.max_replicas=2", env=kube.env)
    assert again.code == 0, again
    assert f"updated InferenceService kubeflow/{name}" in again.out
    assert kube.count("PUT") == 1 and kube.jobs[name]["spec"]["predictor"]["maxReplicas"] == 2


@pytest.mark.integration
def test_deploy_that_never_gets_ready_is_an_error_that_leaves_it(kserve):
    kube, _ = kserve
    result = run_cli(
        "deploy", TINY_DEMO, "--uri", URI, "--set", "serve.ready_timeout_seconds=1", env=kube.env
    )
    assert_user_error(result, "was not Ready within serve.ready_timeout_seconds=1", "left in place")
    assert list(kube.jobs) == ["kt-falcon-lora"] and kube.count("DELETE") == 0


def test_the_pipeline_deploys_only_when_asked(tmp_path):
    from kubetune.components.config import load_recipe
    from kubetune.pipelines.finetune import compile_pipeline

    for enabled in (False, True):
        out = tmp_path / f"p{enabled}.yaml"
        sets = [f"serve.enabled={str(enabled).lower()}", "output.uri=s3://models/tiny-demo"]
        compile_pipeline(load_recipe(TINY_DEMO, sets), str(out))
        ir = yaml.safe_load(out.read_text().split("\n---\n")[0])
        root = ir["root"]["dag"]["tasks"]
        (condition,) = [t for t in root if t.startswith("condition")]
        tasks = ir["components"][root[condition]["componentRef"]["name"]]["dag"]["tasks"]
        assert ("deploy-model" in tasks) is enabled
        if enabled:  # after the push, in the gate's branch
            assert tasks["deploy-model"]["dependentTasks"] == ["push-model"]
