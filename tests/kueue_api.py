"""What Kueue v0.17 refuses in the objects manifests/kueue/ ships: the upstream CRDs in
../shared/schemas/kueue-v0.17.0/ (kueue.x-k8s.io/v1beta2, strict fields, CEL rules; see
tests/k8s_schemas.py) and the rules of Kueue's validating webhooks that no schema shows,
each named with its source (kubernetes-sigs/kueue v0.17.0, pkg/webhooks/)."""

from __future__ import annotations

from .k8s_schemas import DNS1123_SUBDOMAIN, crd_errors, quantity_number

GROUP_VERSION = "kueue.x-k8s.io/v1beta2"
KINDS = ("ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass")


def clusterqueue_webhook_errors(queue: dict) -> list[str]:
    """Kueue's ClusterQueue webhook (clusterqueue_webhook.go, ValidateClusterQueue): a cohort
    name is a DNS subdomain; every resource is covered by one group only and every flavor
    appears once; each flavor lists exactly the covered resources, in their order; quotas are
    not negative; a lendingLimit needs a cohort and is at most the nominal quota."""
    spec = queue.get("spec") or {}
    errors = []
    cohort = spec.get("cohortName", "")
    if cohort and not DNS1123_SUBDOMAIN.match(cohort):
        errors.append(f"spec.cohortName: Invalid value: {cohort!r}: a DNS-1123 subdomain")
    seen_resources: set[str] = set()
    seen_flavors: set[str] = set()
    for g, group in enumerate(spec.get("resourceGroups") or []):
        covered = group.get("coveredResources") or []
        for r, name in enumerate(covered):
            if name in seen_resources:
                errors.append(f"spec.resourceGroups[{g}].coveredResources[{r}]: Duplicate value")
            seen_resources.add(name)
        for f, flavor in enumerate(group.get("flavors") or []):
            where = f"spec.resourceGroups[{g}].flavors[{f}]"
            if flavor.get("name") in seen_flavors:
                errors.append(f"{where}.name: Duplicate value: {flavor.get('name')!r}")
            seen_flavors.add(flavor.get("name"))
            names = [q.get("name") for q in flavor.get("resources") or []]
            if names != covered:
                errors.append(
                    f"{where}.resources: {names} must be the coveredResources {covered}, in "
                    "that order"
                )
            for q, quota in enumerate(flavor.get("resources") or []):
                nominal = quantity_number(quota.get("nominalQuota", 0))
                for key in ("nominalQuota", "borrowingLimit", "lendingLimit"):
                    if key in quota and quantity_number(quota[key]) < 0:
                        errors.append(f"{where}.resources[{q}].{key}: must be non-negative")
                if "lendingLimit" in quota:
                    if not cohort:
                        errors.append(
                            f"{where}.resources[{q}].lendingLimit: must be nil when cohort is empty"
                        )
                    if quantity_number(quota["lendingLimit"]) > nominal:
                        errors.append(
                            f"{where}.resources[{q}].lendingLimit: must be less than or equal "
                            "to the nominalQuota"
                        )
    return errors


def kueue_errors(obj: dict) -> list[str]:
    """What Kueue's API server and webhooks would refuse in one object."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return [f"{kind}: not a Kueue kind kubetune ships"]
    errors = [f"{kind} {e}" for e in crd_errors(obj, kind)]
    if kind == "LocalQueue" and not (obj.get("metadata") or {}).get("namespace"):
        errors.append(f"LocalQueue {obj['metadata'].get('name')}: needs a namespace")
    if kind == "ClusterQueue" and not errors:
        errors += [f"ClusterQueue {e}" for e in clusterqueue_webhook_errors(obj)]
    return errors
