"""Kubernetes values are checked before anything is sent: each bad value is a one-line error
naming the recipe key (exit 2) in config, render-job and train alike; good values still render
jobs that the Training Operator's CRD and the core schema accept."""

from __future__ import annotations

import pytest
import yaml

from kubetune.components.k8s_values import QUANTITY, pod_name_room

from .conftest import RECIPES, assert_user_error
from .k8s_schemas import crd_errors, pod_template_errors

FALCON_7B = RECIPES / "falcon-7b-qlora.yaml"


def schema_errors(job: dict) -> list[str]:
    """The Training Operator's CRD and the core PodTemplate schema, both strict."""
    errors = crd_errors(job)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        errors += pod_template_errors(replica["template"])
    return errors


BAD = [
    ("kubernetes.memory=32Gb", "kubernetes.memory must be a Kubernetes quantity"),
    ("kubernetes.cpu=-4", "kubernetes.cpu must be a Kubernetes quantity"),
    ("kubernetes.cpu=0", "kubernetes.cpu must be more than zero"),
    ("kubernetes.shm_size=lots", "kubernetes.shm_size must be a Kubernetes quantity"),
    ("kubernetes.namespace=Team_A", "kubernetes.namespace must be a DNS-1123 label"),
    ("kubernetes.s3_secret=my secret", "kubernetes.s3_secret must be a DNS-1123 subdomain"),
    ("kubernetes.service_account=-sa", "kubernetes.service_account must be a DNS-1123"),
    ("kubernetes.gpu_resource=gpu", "kubernetes.gpu_resource must be an extended resource"),
    ("kubernetes.node_selector={'bad key': x}", "kubernetes.node_selector key 'bad key'"),
    ("kubernetes.node_selector={pool: 'a b'}", "kubernetes.node_selector.pool must be a label"),
    ("kubernetes.tolerations=[{key: k, operator: Maybe}]", "tolerations[0].operator must be"),
    ("kubernetes.tolerations=[{key: k, effect: NoRun}]", "tolerations[0].effect must be one of"),
    ("kubernetes.tolerations=[{key: k, operator: Exists, value: v}]", "value must be empty"),
    ("kubernetes.tolerations=[{operator: Equal, value: v}]", "without a key needs operator"),
    ("kubernetes.tolerations=[{key: k, tolerationSeconds: 5}]", "needs effect NoExecute"),
    ("kubernetes.tolerations=[{key: k, colour: red}]", "unknown field(s) colour"),
]


CASES = [("config", setting, message) for setting, message in BAD] + [
    ("render-job", *BAD[10]),
    ("train", *BAD[0]),
]


@pytest.mark.parametrize("command, setting, message", CASES, ids=[f"{c}-{s}" for c, s, _ in CASES])
def test_bad_kubernetes_values_are_refused_naming_the_key(cli, tmp_path, command, setting, message):
    args = [command, FALCON_7B, "--set", setting]
    if command == "train":
        args += ["--dataset", tmp_path / "d", "--output", tmp_path / "o"]
    result = cli(*args)
    assert_user_error(result, message, f"--set {setting}")
    assert not (tmp_path / "o").exists()


def test_an_error_in_the_recipe_file_names_its_line(cli, tmp_path):
    text = FALCON_7B.read_text().replace("memory: 320Gi", "memory: 320GB")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    line = text.splitlines().index("  memory: 320GB") + 1
    assert_user_error(cli("config", recipe), f"{recipe}:{line}: kubernetes.memory must be")


@pytest.mark.parametrize(
    "name, nodes, ok",
    [
        ("falcon-7b", 1, True),
        ("Bad_Name!", 1, False),
        ("7b-falcon", 1, False),  # a DNS-1123 label, but the PyTorchJob webhook wants DNS-1035
        ("a" * 54, 1, True),  # NAME-master-0 fits in a 63-character DNS label
        ("a" * 55, 1, False),
        ("a" * 54, 12, False),  # NAME-worker-10 does not fit
        ("a" * 53, 12, True),
    ],
)
def test_job_names_leave_room_for_the_operators_pod_names(cli, name, nodes, ok):
    result = cli(
        "render-job",
        FALCON_7B,
        "--name",
        name,
        "--set",
        f"distributed.nodes={nodes}",
    )
    if ok:
        assert result.code == 0, result
        job = yaml.safe_load(result.out)
        assert schema_errors(job) == []
        pods = [f"{name}-master-0"] + [f"{name}-worker-{i}" for i in range(nodes - 1)]
        assert all(len(p) <= 63 for p in pods)
    else:
        assert_user_error(result, "--name must be a DNS-1035 label")
        # what the Training Operator's webhook would have said of it (tests/k8s_schemas.py)
        from .k8s_schemas import pytorchjob_webhook_errors

        meta = {"name": name}
        assert len(name) > pod_name_room(nodes) or pytorchjob_webhook_errors({"metadata": meta})
    assert pod_name_room(nodes) == 63 - len(f"-worker-{max(0, nodes - 2)}")


def test_the_quantity_grammar_matches_the_api_servers_examples():
    good = ["64Gi", "500m", "8", "1.5", ".5", "1e3", "2E-1", "128974848", "129M", "+1Ki", "0"]
    bad = ["32Gb", "1.5.2", "Gi", "1 Gi", "1gi", "1KiB", "e3", ""]
    assert all(QUANTITY.match(q) for q in good)
    assert not any(QUANTITY.match(q) for q in bad)


def test_good_values_render_schema_valid_jobs(cli):
    result = cli(
        "render-job",
        FALCON_7B,
        "--set",
        "kubernetes.memory=1.5Ti",
        "--set",
        "kubernetes.cpu=7500m",
        "--set",
        "kubernetes.node_selector={cloud.google.com/gke-accelerator: nvidia-h100-80gb}",
        "--set",
        "kubernetes.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule},"
        " {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute,"
        " tolerationSeconds: 300}]",
    )
    assert result.code == 0, result
    assert schema_errors(yaml.safe_load(result.out)) == []
