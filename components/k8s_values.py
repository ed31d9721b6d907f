"""Kubernetes values checked before anything is sent: what the API server would reject.

The grammars are the API server's own (k8s.io/apimachinery): resource quantities, DNS-1123
labels and subdomains, qualified names (label keys), label values, and toleration fields. Each
check returns the value or raises ValueError with a message that names the recipe key, so the
config model (`components/config.py`) reports `recipe.yaml:LINE: kubernetes.memory ...`.
"""

from __future__ import annotations

import re
from typing import Any

# <signedNumber><suffix>: suffix a binary SI (Ki..Ei), a decimal SI (m, k, M..E) or an exponent
QUANTITY = re.compile(
    r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
DNS1123_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$"
)
QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def quantity(value: str, key: str, allow_zero: bool = True) -> str:
    """A resource quantity (`64Gi`, `500m`, `8`), not negative."""
    text = str(value)
    if not QUANTITY.match(text) or text.startswith("-"):
        raise ValueError(
            f"{key} must be a Kubernetes quantity such as 64Gi, 500m or 8 "
            f"(suffixes Ki Mi Gi Ti Pi Ei, m k M G T P E), got {text!r}"
        )
    number = re.match(r"^[+]?[0-9.]+", text)
    if not allow_zero and float(number.group(0) if number else 0) == 0:
        raise ValueError(f"{key} must be more than zero, got {text!r}")
    return text


SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
          "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}  # fmt: skip


def quantity_value(text: str) -> float:
    """The number a (valid) quantity stands for: bytes for memory, cores for cpu."""
    number, suffix = re.match(r"^([+]?[0-9.]*)(.*)$", text).groups()  # type: ignore[union-attr]
    if suffix[:1] in ("e", "E") and suffix not in SUFFIX:
        return float(number + suffix)
    return float(number) * SUFFIX.get(suffix, 1)


def dns_label(value: str, key: str, max_length: int = 63) -> str:
    """A DNS-1123 label: lower-case alphanumerics and '-', at most max_length characters."""
    if len(value) > max_length or not DNS1123_LABEL.match(value):
        raise ValueError(
            f"{key} must be a DNS-1123 label (lower-case letters, digits and '-', starting and "
            f"ending with a letter or digit, at most {max_length} characters), got {value!r}"
        )
    return value


DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def dns_1035_label(value: str, key: str, max_length: int = 53) -> str:
    """A DNS-1035 label (it starts with a letter), as KServe wants an InferenceService name; at
    most 53 characters so that NAME-predictor, the Service KServe makes, is a DNS label."""
    if len(value) > max_length or not DNS1035_LABEL.match(value):
        raise ValueError(
            f"{key} must be a DNS-1035 label (lower-case letters, digits and '-', starting with "
            f"a letter, ending with a letter or digit, at most {max_length} characters), got "
            f"{value!r}"
        )
    return value


def dns_subdomain(value: str, key: str) -> str:
    """A DNS-1123 subdomain (object names: Secrets, PVCs, ServiceAccounts), at most 253."""
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise ValueError(
            f"{key} must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', at "
            f"most 253 characters), got {value!r}"
        )
    return value


def qualified_name(value: str, key: str) -> str:
    """A label key / resource name: [prefix/]name, prefix a DNS subdomain, name <= 63."""
    prefix, slash, name = value.rpartition("/")
    ok = bool(QUALIFIED_NAME.match(name)) and len(name) <= 63
    if slash:
        ok = ok and bool(prefix) and len(prefix) <= 253 and bool(DNS1123_SUBDOMAIN.match(prefix))
    if not ok:
        raise ValueError(
            f"{key} must be a qualified name ([DNS-subdomain prefix/]name, the name at most 63 "
            f"letters, digits, '-', '_' or '.', starting and ending alphanumeric), got {value!r}"
        )
    return value


def label_value(value: str, key: str) -> str:
    if value and (len(value) > 63 or not QUALIFIED_NAME.match(value)):
        raise ValueError(
            f"{key} must be a label value (empty, or at most 63 letters, digits, '-', '_' or "
            f"'.', starting and ending alphanumeric), got {value!r}"
        )
    return value


def extended_resource(value: str, key: str) -> str:
    """A GPU resource name such as nvidia.com/gpu: a domain-prefixed qualified name."""
    qualified_name(value, key)
    prefix = value.rpartition("/")[0]
    if not prefix or prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        raise ValueError(
            f"{key} must be an extended resource name with a vendor domain such as "
            f"nvidia.com/gpu or amd.com/gpu, got {value!r}"
        )
    return value


def toleration(item: Any, key: str) -> dict:
    """One pod toleration, with the API's rules on operator, value, effect and seconds."""
    if not isinstance(item, dict):
        raise ValueError(f"{key} must be a mapping (key, operator, value, effect), got {item!r}")
    unknown = sorted(set(item) - TOLERATION_KEYS)
    if unknown:
        raise ValueError(f"{key}: unknown field(s) {', '.join(unknown)}")
    operator = item.get("operator", "Equal")
    if operator not in TOLERATION_OPERATORS:
        raise ValueError(f"{key}.operator must be one of Exists, Equal, got {operator!r}")
    if item.get("key"):
        qualified_name(str(item["key"]), f"{key}.key")
    elif operator != "Exists":
        raise ValueError(f"{key}: a toleration without a key needs operator Exists")
    if operator == "Exists" and item.get("value"):
        raise ValueError(f"{key}.value must be empty with operator Exists")
    label_value(str(item.get("value", "") or ""), f"{key}.value")
    effect = item.get("effect", "")
    if effect and effect not in TOLERATION_EFFECTS:
        raise ValueError(
            f"{key}.effect must be one of {', '.join(TOLERATION_EFFECTS)} (or empty), "
            f"got {effect!r}"
        )
    if "tolerationSeconds" in item:
        seconds = item["tolerationSeconds"]
        if effect != "NoExecute" or not isinstance(seconds, int) or isinstance(seconds, bool):
            raise ValueError(
                f"{key}.tolerationSeconds must be an integer and needs effect NoExecute"
            )
    return item


def pod_name_room(nodes: int) -> int:
    """The longest job name whose pods (NAME-master-0, NAME-worker-N) stay DNS-1123 labels."""
    return 63 - len(f"-worker-{max(0, nodes - 2)}")


def check_job_name(value: str, key: str, nodes: int) -> str:
    """A job name the controllers take: a DNS-1035 label (the Training Operator's PyTorchJob
    webhook checks NameIsDNS1035Label; a TrainJob's JobSet names Services after it), short
    enough for the pod and service names made from it."""
    return dns_1035_label(value, key, max_length=pod_name_room(nodes))
