"""Kueue's API (kueue.x-k8s.io/v1beta2) for the objects manifests/kueue/ ships, written from
Kueue's API reference (https://kueue.sigs.k8s.io/docs/reference/kueue.v1beta2/): field names,
types, enums and the rules the CRD's validation states in words (a flavor lists exactly the
covered resources, in order; at most 16 resources and 16 flavors per group). Unknown fields are
errors, as with strict field validation; the fields kubetune's examples do not use
(flavorFungibility, admissionChecksStrategy, ...) are left out of this subset."""

from __future__ import annotations

import jsonschema

from kubetune.components import k8s_values

GROUP_VERSION = "kueue.x-k8s.io/v1beta2"


def _object(properties: dict, required: tuple = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STRING = {"type": "string"}
QUANTITY = {"type": ["string", "integer"]}
LABELS = {"type": "object", "additionalProperties": STRING}
TOLERATION = _object(
    {
        "key": STRING,
        "operator": {"enum": ["Exists", "Equal"]},
        "value": STRING,
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    }
)
TAINT = _object(
    {
        "key": STRING,
        "value": STRING,
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "timeAdded": STRING,
    },
    ("key", "effect"),
)
SELECTOR = _object(
    {
        "matchLabels": LABELS,
        "matchExpressions": {
            "type": "array",
            "items": _object(
                {
                    "key": STRING,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": STRING},
                },
                ("key", "operator"),
            ),
        },
    }
)
METADATA = {"type": "object", "required": ["name"], "properties": {"name": STRING}}
STOP_POLICY = {"enum": ["None", "Hold", "HoldAndDrain"]}

SPECS = {
    "ResourceFlavor": _object(
        {
            "nodeLabels": LABELS,
            "nodeTaints": {"type": "array", "items": TAINT, "maxItems": 8},
            "tolerations": {"type": "array", "items": TOLERATION, "maxItems": 8},
            "topologyName": STRING,
        }
    ),
    "ClusterQueue": _object(
        {
            "resourceGroups": {
                "type": "array",
                "maxItems": 16,
                "items": _object(
                    {
                        "coveredResources": {
                            "type": "array",
                            "items": STRING,
                            "minItems": 1,
                            "maxItems": 16,
                        },
                        "flavors": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 16,
                            "items": _object(
                                {
                                    "name": STRING,
                                    "resources": {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": 16,
                                        "items": _object(
                                            {
                                                "name": STRING,
                                                "nominalQuota": QUANTITY,
                                                "borrowingLimit": QUANTITY,
                                                "lendingLimit": QUANTITY,
                                            },
                                            ("name", "nominalQuota"),
                                        ),
                                    },
                                },
                                ("name", "resources"),
                            ),
                        },
                    },
                    ("coveredResources", "flavors"),
                ),
            },
            "cohortName": STRING,
            "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
            "namespaceSelector": SELECTOR,
            "preemption": _object(
                {
                    "reclaimWithinCohort": {"enum": ["Never", "LowerPriority", "Any"]},
                    "borrowWithinCohort": _object(
                        {
                            "policy": {"enum": ["Never", "LowerPriority"]},
                            "maxPriorityThreshold": {"type": "integer"},
                        }
                    ),
                    "withinClusterQueue": {
                        "enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]
                    },
                }
            ),
            "stopPolicy": STOP_POLICY,
            "fairSharing": _object({"weight": QUANTITY}),
        },
        ("resourceGroups",),
    ),
    "LocalQueue": _object(
        {
            "clusterQueue": STRING,
            "stopPolicy": STOP_POLICY,
            "fairSharing": _object({"weight": QUANTITY}),
        },
        ("clusterQueue",),
    ),
}
CLUSTER_SCOPED = {"ResourceFlavor", "ClusterQueue", "WorkloadPriorityClass"}


def kueue_errors(obj: dict) -> list[str]:
    """What Kueue's API server would refuse in one object."""
    kind = obj.get("kind")
    if obj.get("apiVersion") != GROUP_VERSION:
        return [f"{kind}: apiVersion must be {GROUP_VERSION}"]
    meta = obj.get("metadata") or {}
    errors = []
    try:
        k8s_values.dns_subdomain(meta.get("name", ""), f"{kind} metadata.name")
    except ValueError as exc:
        errors.append(str(exc))
    if kind in CLUSTER_SCOPED and "namespace" in meta:
        errors.append(f"{kind} {meta['name']}: cluster-scoped, no namespace")
    if kind == "LocalQueue" and not meta.get("namespace"):
        errors.append(f"LocalQueue {meta.get('name')}: needs a namespace")
    if kind == "WorkloadPriorityClass":
        schema = _object(
            {
                "apiVersion": STRING,
                "kind": STRING,
                "metadata": METADATA,
                "value": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
                "description": STRING,
            },
            ("apiVersion", "kind", "metadata", "value"),
        )
    elif kind in SPECS:
        schema = _object(
            {"apiVersion": STRING, "kind": STRING, "metadata": METADATA, "spec": SPECS[kind]},
            ("apiVersion", "kind", "metadata", "spec"),
        )
    else:
        return [f"{kind}: not a Kueue kind"]
    validator = jsonschema.Draft7Validator(schema)
    errors += [
        f"{kind} {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    for group in (
        (obj.get("spec") or {}).get("resourceGroups", []) if kind == "ClusterQueue" else []
    ):
        covered = group.get("coveredResources", [])
        for flavor in group.get("flavors", []):
            names = [r.get("name") for r in flavor.get("resources", [])]
            if names != covered:
                errors.append(
                    f"ClusterQueue flavor {flavor.get('name')}: resources {names} must be the "
                    f"coveredResources {covered}, in that order"
                )
            for r in flavor.get("resources", []):
                for key in ("nominalQuota", "borrowingLimit", "lendingLimit"):
                    if key in r:
                        try:
                            k8s_values.quantity(str(r[key]), f"{r['name']} {key}")
                        except ValueError as exc:
                            errors.append(str(exc))
    return errors
