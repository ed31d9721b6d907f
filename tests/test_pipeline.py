"""The KFP pipeline: compiled IR (golden files and its structure), `kubetune run --local` (the
README's main job) through kfp.local, and `kubetune submit` against a loopback KFP API."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from .conftest import RECIPES, TINY_DEMO, assert_user_error, run_cli
from .fake_kfp import FakeKfp

GOLDEN = Path(__file__).parent / "golden"
STEPS = (
    "fetch-model",
    "prepare-dataset",
    "train-model",
    "merge-model",
    "evaluate-model",
    "push-model",
)


def compile_to(path: Path, recipe: Path, *sets: str, env: dict | None = None) -> dict:
    args = [a for s in sets for a in ("--set", s)]
    result = run_cli("compile", recipe, "--output", path, *args, env=env)
    assert result.code == 0, result
    return next(yaml.safe_load_all(path.read_text()))


KFP_WORKSPACE = (
    "kubernetes.workspace=kfp",
    "kubernetes.workspace_size=800Gi",
    "kubernetes.workspace_storage_class=efs-rwx",
)
GOLDENS = {  # golden file → (recipe, --set)
    "tiny-demo": ("tiny-demo", ()),
    "falcon-7b-qlora": ("falcon-7b-qlora", ()),
    "falcon-7b-qlora-kfp-workspace": ("falcon-7b-qlora", KFP_WORKSPACE),
}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_compiled_pipeline_matches_golden_file(name, tmp_path):
    """Regenerate after an intended change: KUBETUNE_UPDATE_GOLDEN=1 python -m pytest -k golden"""
    out = tmp_path / "pipeline.yaml"
    recipe, sets = GOLDENS[name]
    compile_to(out, RECIPES / f"{recipe}.yaml", *sets)
    parse_into_kfp_protos(out)
    golden = GOLDEN / f"{name}.pipeline.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out.read_text())
    assert without_sdk_version(out.read_text()) == without_sdk_version(golden.read_text())


def without_sdk_version(text: str) -> str:
    """The compiled YAML less the line naming the kfp release that compiled it (the newest
    tier compiles with a newer kfp than the pinned one the goldens were written with)."""
    return re.sub(r"^sdkVersion: kfp-\S+$", "sdkVersion: kfp", text, flags=re.M)


def parse_into_kfp_protos(path: Path):
    """The IR and platform spec as KFP's backend reads them: its protos, unknown fields refused."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    ir, platform = list(yaml.safe_load_all(path.read_text()))
    return (
        json_format.ParseDict(ir, pipeline_spec_pb2.PipelineSpec()),
        json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec()),
    )


IR_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", list: "LIST"}


def test_both_pipelines_take_their_parameters_from_the_one_definition(tmp_path):
    """PIPELINE_FIELDS is the only list of the run's parameters: the finetune pipeline's
    signature, the resolve-recipe component's inputs and what both pipelines hand it are
    compiled from it (names, IR types and the recipe's values)."""
    from kubetune.components.config import load_recipe
    from kubetune.components.pipeline_steps.bodies import PIPELINE_FIELDS, field_value

    cfg = load_recipe(TINY_DEMO)
    spec = compile_to(tmp_path / "p.yaml", TINY_DEMO)
    params = spec["root"]["inputDefinitions"]["parameters"]
    fields = {name: (IR_TYPES[kind], dotted) for dotted, name, kind in PIPELINE_FIELDS}
    assert list(params) == sorted(["recipe_yaml", "overrides", "workspace", *fields])
    for name, (ir_type, dotted) in fields.items():
        assert params[name]["parameterType"] == ir_type, name
        assert params[name]["defaultValue"] == field_value(cfg, dotted), name
    component = spec["components"]["comp-resolve-recipe"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in component.items()} == {
        "recipe_yaml": "STRING",
        "overrides": "LIST",
        "workspace": "STRING",
        "run_id": "STRING",
        **{name: ir_type for name, (ir_type, _) in fields.items()},
    }
    task = spec["root"]["dag"]["tasks"]["resolve-recipe"]["inputs"]["parameters"]
    for name in fields:  # the finetune pipeline hands each parameter on by name
        assert task[name]["componentInputParameter"] == name
    out = tmp_path / "compare.yaml"
    assert run_cli("compare", TINY_DEMO, "--methods", "lora,full", "--output", out).code == 0
    compare = next(yaml.safe_load_all(out.read_text()))
    task = compare["root"]["dag"]["tasks"]["resolve-recipe"]["inputs"]["parameters"]
    for name, (_, dotted) in fields.items():  # the comparison fixes them at the recipe's
        assert task[name]["runtimeValue"]["constant"] == field_value(cfg, dotted), name


def test_kfp_workspace_pipeline_mounts_the_runs_own_workspace(tmp_path):
    """kubernetes.workspace=kfp: the pipeline asks KFP for a ReadWriteMany workspace of the
    recipe's size and class, every step gets KFP's workspace placeholder (KFP mounts the
    workspace where a task gets it) instead of the PVC mount, and the train task passes its
    volumes, env, node pool and resources through to the training job."""
    out = tmp_path / "p.yaml"
    ir = compile_to(out, RECIPES / "falcon-7b-qlora.yaml", *KFP_WORKSPACE)
    spec, platform = parse_into_kfp_protos(out)
    kube = platform.platforms["kubernetes"]
    assert kube.pipelineConfig.workspace.size == "800Gi"
    from google.protobuf import json_format

    patch = json_format.MessageToDict(kube.pipelineConfig.workspace.kubernetes.pvc_spec_patch)
    assert patch == {"accessModes": ["ReadWriteMany"], "storageClassName": "efs-rwx"}
    root = ir["root"]["dag"]["tasks"]
    (condition,) = [t for t in root if t.startswith("condition")]
    tasks = {**root, **ir["components"][root[condition]["componentRef"]["name"]]["dag"]["tasks"]}
    for name, task in tasks.items():
        if name == condition:
            continue
        given = task["inputs"]["parameters"]["workspace"]
        assert given == {"runtimeValue": {"constant": "{{$.workspace_path}}"}}, name
    executors = yaml.safe_load_all(out.read_text())
    _, platform_doc = list(executors)
    for name, executor in platform_doc["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ].items():
        assert "pvcMount" not in executor, name
    passed = {
        (p.field, p.apply_to_task)
        for p in spec.components["comp-train-model"].task_config_passthroughs
    }
    from kfp.pipeline_spec.pipeline_spec_pb2 import TaskConfigPassthroughType as T

    kinds = T.TaskConfigPassthroughTypeEnum
    assert passed == {
        (kinds.RESOURCES, False),
        (kinds.KUBERNETES_NODE_SELECTOR, False),
        (kinds.KUBERNETES_TOLERATIONS, False),
        (kinds.KUBERNETES_AFFINITY, False),
        (kinds.ENV, True),
        (kinds.KUBERNETES_VOLUMES, True),
    }
    # the recipe's paths follow the workspace: /kfp-workspace in the resolved recipe
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert '"workspace_mount":"/kfp-workspace"' in params["recipe_yaml"]["defaultValue"]


def test_compiled_pipeline_wires_steps_node_pool_and_secrets(tmp_path):
    secret_value = "sk-THIS-MUST-NOT-APPEAR"
    out = tmp_path / "p.yaml"
    result = run_cli(
        "compile",
        RECIPES / "falcon-40b-qlora.yaml",
        "--output",
        out,
        env={"AWS_SECRET_ACCESS_KEY": secret_value, "HF_TOKEN": secret_value},
    )
    assert result.code == 0, result
    text = out.read_text()
    assert secret_value not in text
    docs = list(yaml.safe_load_all(text))
    ir, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    root = ir["root"]["dag"]["tasks"]
    assert set(root) >= {"resolve-recipe", "prepare-dataset", "train-model", "merge-model"}
    assert {"evaluate-model", "quality-gate"} <= set(root)
    (condition,) = [t for t in root if t.startswith("condition")]
    assert root[condition]["triggerPolicy"]["condition"].endswith("== true")
    push_tasks = ir["components"][root[condition]["componentRef"]["name"]]["dag"]["tasks"]
    assert list(push_tasks) == ["push-model"]
    tasks = {**root, **push_tasks}
    assert all(step in tasks for step in STEPS)
    # the recipe's fields are the pipeline's parameters, with its values as defaults
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["model_name_or_path"]["defaultValue"] == "tiiuae/falcon-40b"
    assert params["distributed_nodes"]["defaultValue"] == 2.0
    assert params["train_lr"]["defaultValue"] == pytest.approx(2e-4)
    assert not any("secret" in p.lower() or "aws" in p.lower() for p in params)
    # caching off for train and push, retries for the transient steps
    assert tasks["train-model"]["cachingOptions"] == {}
    assert tasks["push-model"]["cachingOptions"] == {}
    for step in ("fetch-model", "prepare-dataset", "merge-model", "evaluate-model", "push-model"):
        assert tasks[step]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["train-model"]
    # the model is fetched before anything reads it; the steps that load it get its recipe
    # (model.local_dir) and the hub turned off; prepare keeps the hub for hub datasets
    assert tasks["fetch-model"]["dependentTasks"] == ["resolve-recipe"]
    for step in ("prepare-dataset", "train-model", "merge-model", "evaluate-model"):
        recipe = tasks[step]["inputs"]["parameters"]["recipe_yaml"]["taskOutputParameter"]
        assert recipe["producerTask"] == "fetch-model", step
        env = ir["deploymentSpec"]["executors"][f"exec-{step}"]["container"].get("env", [])
        assert ({"name": "HF_HUB_OFFLINE", "value": "1"} in env) == (step != "prepare-dataset")

    def executor(task: str) -> dict:
        return platform[f"exec-{task}"]

    gpu = executor("evaluate-model")
    assert gpu["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert gpu["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    resources = ir["deploymentSpec"]["executors"]["exec-evaluate-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    # 41.8B parameters in bf16 (+30%) need two 80 GB GPUs to generate with
    assert resources["accelerator"]["resourceCount"] == "2"
    for task in STEPS:
        spec = executor(task)
        assert spec["pvcMount"][0]["mountPath"] == "/workspace"
        assert spec["pvcMount"][0]["constant"] == "kubetune-workspace"
        (secret,) = [s for s in spec["secretAsEnv"] if s["secretName"] == "kubetune-s3"]
        keys = {m["secretKey"] for m in secret["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    assert "nodeSelector" not in executor("train-model")  # the launcher is a CPU pod
    assert images_by_resources(ir) == {"exec-evaluate-model": "ghcr.io/kubetune/trainer:0.1.0"}


def test_evaluate_keeps_the_hub_only_for_registered_lm_eval_tasks(tmp_path):
    """A registered lm-eval task reads its dataset from the hub; a task file needs no hub."""

    def evaluate_env(*sets: str) -> list:
        ir = compile_to(tmp_path / "p.yaml", RECIPES / "falcon-7b-qlora.yaml", *sets)
        return ir["deploymentSpec"]["executors"]["exec-evaluate-model"]["container"].get("env", [])

    offline = {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert offline in evaluate_env("eval.lm_eval_tasks=[/workspace/tasks/mine.yaml]")
    hub = evaluate_env("eval.lm_eval_tasks=[arc_easy,/workspace/tasks/mine.yaml]")
    assert offline not in hub


def images_by_resources(ir: dict, steps_image: str = "ghcr.io/kubetune/steps:0.1.0") -> dict:
    """The executors whose image is not the steps image, and that image; asserts along the way
    that exactly the executors asking for accelerators run another (the CUDA) image."""
    other = {}
    for name, executor in ir["deploymentSpec"]["executors"].items():
        container = executor["container"]
        gpus = container.get("resources", {}).get("accelerator")
        assert (container["image"] != steps_image) == bool(gpus), (name, container["image"])
        if gpus:
            other[name] = container["image"]
    return other


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_gpu_task_runs_in_the_cuda_image(recipe, tmp_path):
    """For every shipped recipe: a task with accelerators runs in kubernetes.trainer_image, a
    task without them in kubernetes.steps_image (the CPU build of PyTorch)."""
    from kubetune.components.config import load_recipe
    from kubetune.pipelines.finetune import compile_pipeline

    cfg = load_recipe(RECIPES / f"{recipe}.yaml")
    compile_pipeline(cfg, str(tmp_path / "p.yaml"))  # what `kubetune compile` runs, in this process
    ir = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    other = images_by_resources(ir, cfg.kubernetes.steps_image)
    assert set(other.values()) <= {cfg.kubernetes.trainer_image}
    assert bool(other) == (cfg.hardware.gpu != "none")


def run_local(tmp_path: Path, output: Path, *sets: str, env: dict | None = None):
    """`kubetune run tiny-demo.yaml --local --set output.uri=OUTPUT --set ... --workspace W`"""
    args = [a for s in (f"output.uri={output}", *sets) for a in ("--set", s)]
    return run_cli(
        "run", TINY_DEMO, "--local", *args, "--workspace", tmp_path / "work", cwd=tmp_path, env=env
    )


@pytest.mark.integration
def test_run_local_tiny_demo_is_the_main_job(tmp_path):
    """The main job, run with sentinel secrets in the environment (test_secrets.py): none of
    them ends up in its console, logs, reports, metrics, manifest or model."""
    from .test_secrets import SENTINELS, assert_no_secret

    output = tmp_path / "model"
    result = run_local(tmp_path, output, env=SENTINELS)
    assert result.code == 0, result
    assert assert_no_secret([result], tmp_path) > 50
    manifest = json.loads((output / "manifest.json").read_text())
    assert (
        manifest["kind"] == "merged" and manifest["base_model"]["name_or_path"] == "tiny://falcon"
    )
    evaluation = manifest["metrics"]["evaluation"]
    assert evaluation["tuned"]["rougeL"] > evaluation["baseline"]["rougeL"]
    assert evaluation["tuned"]["eval_loss"] < evaluation["baseline"]["eval_loss"]
    assert evaluation["gate"]["passed"] is True
    report = next(line for line in result.out.splitlines() if line.startswith("report: "))
    html = Path(report.removeprefix("report: ")).read_text()
    assert f"{evaluation['tuned']['rougeL']:.4f}" in html and "<svg" in html
    assert f"model:  {output}" in result.out
    # the console: a line per step as it starts and ends, training progress, the summary;
    # KFP's executor logs only in the run folder's log
    lines = result.out.splitlines()
    assert len(lines) < 60, result.out
    for step in ("resolve-recipe", "prepare-dataset", "train-model", "merge-model", "push-model"):
        assert re.search(rf"^  {step} +success +[0-9.]+ s$", result.out, re.M), step
    assert re.search(r"step \d+/\d+ loss", result.out)
    assert "executor_input" not in result.out and "Executing task" not in result.out
    log = Path(next(line for line in lines if line.startswith("log: ")).split()[-1])
    assert (
        log.name == "kfp-local.log"
        and log.parent == Path(report.removeprefix("report: ")).parent.parent
    )
    assert "Executing task 'train-model'" in log.read_text()
    pulled = run_cli("pull", output, tmp_path / "pulled")
    assert pulled.code == 0, pulled  # every checksum in the manifest holds
    # the training run's TensorBoard events went along with the model, and say its losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert any(f["path"].startswith("tensorboard/") for f in manifest["files"])
    events = EventAccumulator(str(tmp_path / "pulled" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    trained = json.loads((tmp_path / "pulled" / "training_metrics.json").read_text())["loss"]
    assert [step for step, _ in logged] == [step for step, _ in trained]
    for (_, a), (_, b) in zip(logged, trained, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # the train task's Metrics are its last log line's figures: 100%, the last loss
    (executed,) = (tmp_path / "work" / "kfp-root").rglob("train-model/executor_output.json")
    (metrics,) = json.loads(executed.read_text())["artifacts"]["metrics"]["artifacts"]
    figures = metrics["metadata"]
    assert figures["progress_percentage"] == 100 and figures["estimated_remaining_seconds"] == 0
    assert figures["loss"] == pytest.approx(trained[-1][1], abs=1e-6)
    last = f"step {int(figures['step'])}/{int(figures['step'])} loss {trained[-1][1]:.4f} "
    assert re.search(rf"^ +{re.escape(last)}\d+ tokens/s eta 0s$", result.out, re.M), result.out
    # the train step's Markdown: the speed prediction, or why there is none (no GPU type here)
    (train_summary,) = (tmp_path / "work" / "kfp-root").rglob("train-model*/summary")
    assert "No speed prediction for this run" in train_summary.read_text()
    # the push step's Markdown in the KFP UI links the model, its manifest and its events
    (summary,) = (tmp_path / "work" / "kfp-root").rglob("push-model*/summary")
    text = summary.read_text()
    assert (
        f"{output}/manifest.json" in text and f"tensorboard --logdir {output}/tensorboard" in text
    )


@pytest.mark.integration
def test_run_local_does_not_push_when_the_gate_fails(tmp_path):
    output = tmp_path / "model"
    # an untrained model generates to max_new_tokens: few prompts and tokens keep this short
    gate = ("eval.min_rouge_l=0.99", "eval.num_prompts=4", "eval.max_new_tokens=8")
    result = run_local(tmp_path, output, "train.max_steps=2", *gate)
    assert_user_error(result, "the quality gate failed (rougeL", "the model was not pushed")
    assert not output.exists()
    bad = run_cli("run", TINY_DEMO, "--local", "--set", "train.lr=fast")
    assert_user_error(bad, "train.lr")
    # a step that fails: its status line, then its last lines (the error) on the console
    missing = tmp_path / "missing.jsonl"
    failed = run_local(tmp_path, output, f"data.path={missing}", "data.format=alpaca")
    assert failed.code == 1, failed
    assert re.search(r"^  prepare-dataset +failure", failed.out, re.M), failed.out
    assert str(missing) in failed.out.split("prepare-dataset", 2)[-1]
    assert "the whole log: " in failed.err and "kfp-local.log" in failed.err


def test_submit_creates_a_run_then_a_recurring_run(tmp_path):
    kfp = FakeKfp()
    try:
        run = run_cli("submit", TINY_DEMO, "--host", kfp.url, "--experiment", "nightly")
        assert run.code == 0, run
        recurring = run_cli(
            "submit",
            TINY_DEMO,
            "--host",
            kfp.url,
            "--experiment",
            "nightly",
            "--schedule",
            "0 3 * * 1",
        )
        assert recurring.code == 0, recurring
    finally:
        kfp.close()
    (created,) = kfp.calls("POST", "/apis/v2beta1/experiments")
    assert created["body"] == {"display_name": "nightly"}
    (upload,) = kfp.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == "kubetune-falcon-lora"
    (version_upload,) = kfp.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    pipeline_id = version_upload["query"]["pipelineid"]
    # what was uploaded is exactly what `kubetune compile` writes
    compiled = tmp_path / "p.yaml"
    compile_to(compiled, TINY_DEMO)
    assert kfp.uploads[0] == kfp.uploads[1] == compiled.read_bytes()

    (run_call,) = kfp.calls("POST", "/apis/v2beta1/runs")
    body = run_call["body"]
    first_version = kfp.versions[pipeline_id][-1]["pipeline_version_id"]
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": first_version,
    }
    assert body["experiment_id"] == next(iter(kfp.experiments))
    assert body["service_account"] == "kubetune"
    assert body["display_name"].startswith("kubetune-falcon-lora-")
    assert f"run: {kfp.runs[0]['run_id']}" in run.out and "url: " in run.out

    (rec_call,) = kfp.calls("POST", "/apis/v2beta1/recurringruns")
    rec = rec_call["body"]
    assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert rec["max_concurrency"] == 1 and rec["mode"] == "ENABLE"
    assert rec["service_account"] == "kubetune"
    assert rec["pipeline_version_reference"]["pipeline_version_id"] == version_upload_id(kfp)
    assert "recurring_run: " in recurring.out


def version_upload_id(kfp: FakeKfp) -> str:
    pid = next(iter(kfp.versions))
    return kfp.versions[pid][0]["pipeline_version_id"]


def test_submit_errors_are_clear():
    bad_cron = run_cli("submit", TINY_DEMO, "--host", "http://127.0.0.1:9", "--schedule", "daily")
    assert_user_error(bad_cron, "--schedule 'daily': a cron expression has 5 or 6 fields")
    down = run_cli("submit", TINY_DEMO, "--host", "http://127.0.0.1:9")
    assert_user_error(down, "KFP endpoint http://127.0.0.1:9")
