"""Every command answers bad input with exit 2 and one line naming the problem and where: no
traceback, and no output left behind that looks complete. One row per case, through the CLI's
main() in the test process (run_cli_here: the console script's code without an interpreter's
start-up per row). NEWEST holds the commands added since the first such pass (render-serve,
deploy, push to a registry, lm-eval tasks, compare, plan's GPU list, Kueue settings, pull),
and the settings that compile and render-serve now refuse before any work rather than at the
end of a run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from .conftest import RECIPES, TINY_DEMO, assert_user_error, run_cli_here


def write_inputs(tmp: Path) -> None:
    """The inputs the table refers to, written into tmp."""
    (tmp / "empty").mkdir()
    (tmp / "file.json").write_text("{}")
    (tmp / "bad.yaml").write_text("model: [\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp / "wizard.jsonl").write_text(
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n"
    )
    (tmp / "no-answer.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    write_pushed_models(tmp)
    tasks = tmp / "tasks"  # an lm-eval task whose !function helper module is not there
    tasks.mkdir()
    (tasks / "d.jsonl").write_text(json.dumps({"q": "q", "choices": ["a", "b"], "label": 0}) + "\n")
    (tasks / "helper.yaml").write_text(
        "task: tiny_helper\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "process_docs: !function helpers.process_docs\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
    )


def write_pushed_models(tmp: Path) -> None:
    """A model folder, and pushed copies of it whose manifest.json is damaged one way each."""
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    (model / "notes.txt").write_text("hi\n")
    files = [
        {"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(model.iterdir())
    ]  # fmt: skip
    damaged = {
        "no-sha": lambda fs: fs[0].pop("sha256"),
        "size-text": lambda fs: fs[0].update(size="big"),
        "twice": lambda fs: fs.append(dict(fs[0])),
        "files-dict": None,
    }
    for name, damage in damaged.items():
        folder = tmp / "pushed" / name
        shutil.copytree(model, folder)
        entries = [dict(f) for f in files]
        if damage:
            damage(entries)
        manifest = {"format": "kubetune.manifest/v1", "files": entries if damage else {"a": 1}}
        (folder / "manifest.json").write_text(json.dumps(manifest))


R = str(TINY_DEMO)
# (command line with {tmp} for the test's folder, fragments of the error, output that must not exist)
CASES = [
    ("train {R} --dataset {tmp}/empty --output {tmp}/out", ["empty: not a finished"], "out"),
    ("train {R} --dataset {tmp}/file.json --output {tmp}/out", ["not a finished"], "out"),
    ("train {R} --dataset {tmp}/nothing --output {tmp}/out", ["nothing"], "out"),
    ("merge {R} --adapter {tmp}/empty --output {tmp}/out", ["not a LoRA adapter"], "out"),
    ("merge {R} --adapter {tmp}/file.json --output {tmp}/out", ["not a LoRA adapter"], "out"),
    (
        "evaluate {R} --model {tmp}/empty --dataset {tmp}/empty --output {tmp}/out",
        ["empty: not a `kubetune prepare` output"],
        "out",
    ),
    ("push {tmp}/empty {tmp}/out", ["nothing to push"], "out"),
    ("push {tmp}/nothing {tmp}/out", ["nothing: no such folder"], "out"),
    ("pull {tmp}/empty {tmp}/out", ["no manifest.json"], "out"),
    ("pull {tmp}/nothing {tmp}/out", ["no manifest.json"], "out"),
    (
        "fetch-model {R} --set model.name_or_path=s3:///m --workspace {tmp}/ws",
        ["s3:///m: an S3 URI needs a bucket"],
        "ws",
    ),
    (
        "prepare {R} --output {tmp}/out --set model.local_dir={tmp}/empty",
        ["model.local_dir", "no config.json"],
        "out",
    ),
    ("config {R} --set foo", ["--set foo: expected key=value"], None),
    ("config {R} --set =3", ["--set =3: expected key=value"], None),
    ("plan {R} --set train.lr=abc", ["--set train.lr=abc: train.lr"], None),
    ("config {tmp}/bad.yaml", ["bad.yaml:2: invalid YAML"], None),
    ("config {tmp}/list.yaml", ["a recipe is a YAML mapping"], None),
    ("config {tmp}/nothing.yaml", ["no such recipe file"], None),
    (
        "render-job {R} --set distributed.backend=pytorchjob --dataset rel/path",
        ["--dataset rel/path", "inside the pods"],
        None,
    ),
    ("compile {R} --output {tmp}/out.yaml --set data.colour=red", ["data.colour"], "out.yaml"),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/bad.parquet",
        ["bad.parquet: cannot read Parquet"],
        "out",
    ),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/wizard.jsonl --set data.format=chat",
        ["wizard.jsonl:1:", "role must be system, user or assistant"],
        "out",
    ),
    (
        "prepare {R} --output {tmp}/out --set data.path={tmp}/no-answer.jsonl "
        "--set data.format=chat",
        ["no-answer.jsonl:1:", "no assistant message"],
        "out",
    ),
    ("run {R} --local --set train.lr=-1 --workspace {tmp}/out", ["train.lr must be > 0"], "out"),
]


F = str(RECIPES / "falcon-7b-qlora.yaml")
S3 = "--uri s3://models/falcon-7b"
REGISTRY = 'output.model_registry={{"server":"http://r:8080","model_name":"m","author":"a"}}'
NEWEST = [
    ("render-serve {F} --uri {tmp}/model", ["--uri", "KServe's storage initializer reads"], None),
    ("render-serve {F} " + S3 + " --name Bad_Name", ["--name must be a DNS-1035 label"], None),
    ("render-serve {F} " + S3 + " --set hardware.gpu=X100", ["unknown GPU 'X100'"], None),
    (
        "render-serve {F} " + S3 + " --set hardware.gpu=L4-24GB --set serve.gpus=1 "
        "--set model.name_or_path=tiiuae/falcon-40b",
        ["serve.gpus=1", "need at least 5 x L4-24GB"],
        None,
    ),
    (
        "render-serve {F} " + S3 + " --set hardware.gpu=none --set serve.memory=1Gi",
        ["serve.memory=1Gi", "13.8 GB of bf16 weights"],
        None,
    ),
    ("render-serve {R} " + S3 + " --set serve.backend=vllm", ["vllm needs GPUs"], None),
    ("render-serve {F} " + S3 + " --set train.kernels=liger", ["no kernels for model type"], None),
    ("deploy {F} --uri {tmp}/model", ["KServe's storage initializer reads"], None),
    ("push {tmp}/model {tmp}/out --version v1", ["--version v1: only used with --recipe"], "out"),
    (
        "push {tmp}/model {tmp}/out --recipe {R} --version v1",
        ["--version v1", "no output.model_registry"],
        "out",
    ),
    ("push {tmp}/model {tmp}/out --recipe {R} --set " + REGISTRY, ["--version: name the"], "out"),
    (
        "evaluate {R} --model tiny://falcon --dataset {dataset} --output {tmp}/out "
        "--set eval.lm_eval_tasks=[{tmp}/tasks/helper.yaml]",
        ["eval.lm_eval_tasks[0]", "helper.yaml", "Cannot import module 'helpers'"],
        "out",
    ),
    (
        "compile {R} --output {tmp}/out.yaml --set serve.enabled=true",
        ["output.uri (serve.enabled) ./kubetune-output/tiny-demo", "KServe"],
        "out.yaml",
    ),
    (
        "compile {F} --output {tmp}/out.yaml --set serve.enabled=true "
        "--set output.uri=s3://m/f --set hardware.gpu=none --set serve.backend=vllm",
        ["serve.backend=vllm needs GPUs"],
        "out.yaml",
    ),
    ("compile {F} --output {tmp}/out.yaml --set train.kernels=liger", ["Liger has no"], "out.yaml"),
    ("compile {F} --output {tmp}/out.yaml --set hardware.gpu=X100", ["unknown GPU"], "out.yaml"),
    (
        "compile {F} --output {tmp}/out.yaml --set distributed.backend=trainjob "
        "--set kubernetes.priority_class=high",
        ["kubernetes.priority_class: a TrainJob cannot set"],
        "out.yaml",
    ),
    (
        "compile {F} --output {tmp}/out.yaml --set distributed.backend=pytorchjob "
        "--set model.local_dir=/elsewhere/m",
        ["model.local_dir: /elsewhere/m is not on the workspace volume"],
        "out.yaml",
    ),
    (
        "compile {R} --output {tmp}/out.yaml --set kubernetes.queue=team-a",
        ["kubernetes.queue=team-a", "distributed.backend=local"],
        "out.yaml",
    ),
    (
        "compare {F} --methods lora,full --output {tmp}/out.yaml --set hardware.gpu=X100",
        ["unknown GPU 'X100'"],
        "out.yaml",
    ),
    (
        "compare {R} --methods lora,full --output {tmp}/out.yaml --set eval.engine=vllm",
        ["eval.engine=vllm generates on the GPU nodes"],
        "out.yaml",
    ),
    ("plan {F} --gpus=", ["--gpus: name at least one GPU type"], None),
    ("plan {F} --gpus 0xH100", ["--gpus 0xH100: a count of GPUs is at least 1"], None),
    ("plan {F} --gpus H100,H100-80GB", ["8 x H100-80GB is listed twice"], None),
    (
        "plan {F} --set model.name_or_path=nobody/nothing",
        ["no config for 'nobody/nothing'"],
        None,
    ),
    ("render-job {F} --set train.kernels=liger", ["Liger has no kernels for model type"], None),
    ("pull {tmp}/pushed/no-sha {tmp}/out", ["files[0] (config.json): no sha256"], "out"),
    ("pull {tmp}/pushed/size-text {tmp}/out", ["files[0] (config.json): size must be"], "out"),
    ("pull {tmp}/pushed/twice {tmp}/out", ["files[2]: config.json is listed twice"], "out"),
    ("pull {tmp}/pushed/files-dict {tmp}/out", ["'files' must be a list"], "out"),
]


def ids(cases) -> list[str]:
    return [f"{c[0].split(' ')[0]}-{n}" for n, c in enumerate(cases)]


def check_case(request, tmp_path, line: str, fragments: list[str], output: str | None) -> None:
    write_inputs(tmp_path)
    dataset = request.getfixturevalue("tiny_dataset") if "{dataset}" in line else None
    args = line.format(R=R, F=F, tmp=tmp_path, dataset=dataset).split()
    result = run_cli_here(*args, env={"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert len([x for x in result.err.strip().splitlines() if x.strip()]) <= 2, result
    if output:
        assert not (tmp_path / output).exists(), output


@pytest.mark.parametrize("line, fragments, output", CASES, ids=ids(CASES))
def test_bad_input_is_one_clear_line(request, tmp_path, line, fragments, output):
    check_case(request, tmp_path, line, fragments, output)


@pytest.mark.parametrize("line, fragments, output", NEWEST, ids=ids(NEWEST))
def test_bad_input_to_the_newest_commands_is_one_clear_line(
    request, tmp_path, line, fragments, output
):
    check_case(request, tmp_path, line, fragments, output)


def test_the_console_script_gives_the_same_one_line():
    """The table runs main() in-process; the installed console script answers alike."""
    from .conftest import run_cli

    result = run_cli("plan", F, "--gpus", "0xH100")
    assert_user_error(result, "--gpus 0xH100: a count of GPUs is at least 1")
    assert len(result.err.strip().splitlines()) == 1, result
