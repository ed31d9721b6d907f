"""`kubetune deploy` and the pipeline's optional deploy step (`serve.enabled`): apply the
InferenceService of a pushed model (create it, or replace the spec of the one of that name),
wait until KServe says it is Ready (at most `serve.ready_timeout_seconds`; a timeout is an error
that leaves it in place), then send one chat/completions request to its OpenAI route and return
the answer, which the pipeline puts in the run's Markdown."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from ..config import RunConfig
from ..errors import UserError
from .render import GROUP, PLURAL, VERSION, render_inference_service


def _poll() -> float:
    return float(os.environ.get("KUBETUNE_SERVE_POLL", "5"))


def ready(isvc: dict) -> tuple[bool, str]:
    """(Ready, why not) from the InferenceService's conditions."""
    for condition in (isvc.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            why = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return condition.get("status") == "True", why
    return False, "no Ready condition yet"


def url_of(isvc: dict) -> str | None:
    status = isvc.get("status") or {}
    return (status.get("address") or {}).get("url") or status.get("url")


def apply(api, isvc: dict) -> str:
    """Create the InferenceService, or replace the spec of the existing one; 'created' or
    'updated'."""
    from ..backends.kube_api import NotFound

    name, ns = isvc["metadata"]["name"], api.namespace
    where = (GROUP, VERSION, ns, PLURAL)
    try:
        current = api.call(
            f"get inferenceservice {name}", api.custom.get_namespaced_custom_object, *where, name
        )
    except NotFound:
        current = None
    if current is None:
        api.call(
            f"create inferenceservice {name}",
            api.custom.create_namespaced_custom_object,
            *where,
            isvc,
        )
        return "created"
    body = {
        **isvc,
        "metadata": {**isvc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
    }
    api.call(
        f"replace inferenceservice {name}",
        api.custom.replace_namespaced_custom_object,
        *where,
        name,
        body,
    )
    return "updated"


def ask(url: str, model: str, prompt: str, timeout: float = 120) -> str:
    """One chat/completions request to KServe's OpenAI route; the answer's text."""
    request = urllib.request.Request(
        url.rstrip("/") + "/openai/v1/chat/completions",
        data=json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "temperature": 0,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
        return body["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"asking {url} ({model}): {exc.__class__.__name__}: {exc}") from None


def inference_service_kind():
    """The API calls' view of a KServe InferenceService: Ready when it serves."""
    from ..backends.kube_api import JobKind

    return JobKind(
        kind="InferenceService",
        group="serving.kserve.io",
        version="v1beta1",
        plural="inferenceservices",
        container="kserve-container",
        success="Ready",
        conditions=("Ready",),
        render=None,  # not launched: render.py renders it, apply() applies it
        lead_selector=lambda isvc: f"serving.kserve.io/inferenceservice={isvc['metadata']['name']}",
        operator="KServe",
        suspend=(),
    )


def deploy(cfg: RunConfig, uri: str, name: str | None = None) -> dict:
    """Apply, wait for Ready, ask; {name, namespace, action, url, prompt, answer, seconds}."""
    from ..backends.kube_api import JobApi

    isvc = render_inference_service(cfg, uri, name)
    name = isvc["metadata"]["name"]
    api = JobApi(cfg.kubernetes.namespace, inference_service_kind())
    where = f"InferenceService {api.namespace}/{name}"
    action = apply(api, isvc)
    print(f"{action} {where} ({uri})", flush=True)
    started = time.monotonic()
    deadline = started + cfg.serve.ready_timeout_seconds
    reported = None
    while True:
        current = api.get(name)
        if current is None:
            raise UserError(f"{where} was deleted while it started")
        ok, why = ready(current)
        if ok and url_of(current):
            break
        if why != reported:
            reported = why
            print(f"{where}: not ready ({why})", flush=True)
        if time.monotonic() > deadline:
            raise UserError(
                f"{where} was not Ready within serve.ready_timeout_seconds="
                f"{cfg.serve.ready_timeout_seconds} ({why}); it was left in place: "
                f"`kubectl -n {api.namespace} describe inferenceservice {name}` says why"
            )
        time.sleep(_poll())
    seconds = round(time.monotonic() - started, 1)
    url = url_of(current)
    print(f"{where} is Ready at {url} after {seconds:g} s", flush=True)
    answer = ask(url or "", name, cfg.serve.prompt)
    return {
        "name": name,
        "namespace": api.namespace,
        "action": action,
        "url": url,
        "prompt": cfg.serve.prompt,
        "answer": answer,
        "seconds": seconds,
    }


def deployed_summary(result: dict) -> str:
    """The run's Markdown for the KFP UI: where the model is served and its first answer."""
    return (
        f"# Served: `{result['namespace']}/{result['name']}`\n\n"
        f"- OpenAI endpoint: `{result['url'].rstrip('/')}/openai/v1/chat/completions` "
        f"(model `{result['name']}`), Ready after {result['seconds']:g} s\n\n"
        f"**Q:** {result['prompt']}\n\n**A:** {result['answer']}\n"
    )
