"""How far training is, for people watching the job rather than its log.

`Figures` are the numbers of one logging step: percent done, estimated time remaining, loss and
tokens/s. Rank 0 prints them in its `step N/M ...` line, the KFP train task logs the final ones
as its Metrics, and on a TrainJob `TrainerStatus` sends them to Kubeflow Trainer's trainer
status API, which puts them in the TrainJob's `status.trainerStatus` (`kubectl get trainjob -o
yaml`, the Kubeflow SDK). Trainer v2.2+ injects the endpoint into the trainer pods when its
`TrainJobStatus` feature gate is on: KUBEFLOW_TRAINER_SERVER_URL (HTTPS, the job's own status
path), _CA_CERT (the CA file) and _TOKEN (a projected ServiceAccount token file, which rotates:
read at every update), the names transformers' Kubeflow callback and the Kubeflow SDK read too
(kubeflow/trainer v2.3.0, pkg/runtime/framework/plugins/trainjobstatus/trainjobstatus.go).
Without them (a PyTorchJob, a local run, the gate off) nothing is sent.

Updates go at most once per 5 s (the last one, at 100%, always), from a background thread so a
slow endpoint never stalls a step; a failing endpoint is reported once on stderr and never
fails training.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

from ..console import duration

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"
MIN_INTERVAL = 5.0  # seconds between updates, as the Kubeflow SDK's update_runtime_status
TIMEOUT = 5.0


@dataclass(frozen=True)
class Figures:
    step: int
    steps: int
    loss: float
    tokens_per_second: float
    percent: int
    eta_seconds: int | None  # unknown before a step of this process has finished

    @classmethod
    def of(
        cls, step: int, steps: int, start: int, loss: float, tokens: float, elapsed: float
    ) -> Figures:
        """`start`: the step this process began at (a resumed run's checkpoint); `elapsed`:
        seconds of training since then, pauses for checkpoints and evals left out."""
        done = step - start
        eta = round(elapsed / done * (steps - step)) if done > 0 and elapsed > 0 else None
        return cls(
            step=step,
            steps=steps,
            loss=loss,
            tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
            percent=min(100, step * 100 // max(steps, 1)),
            eta_seconds=eta,
        )

    def eta(self) -> str:
        return "?" if self.eta_seconds is None else duration(self.eta_seconds)

    def metrics(self) -> dict[str, float]:
        """The figures as metrics (the KFP task's Metrics and the TrainJob's)."""
        out = {
            "progress_percentage": float(self.percent),
            **({"loss": round(self.loss, 6)} if self.loss == self.loss else {}),  # not NaN
            "tokens_per_second": round(self.tokens_per_second, 1),
            "step": float(self.step),
        }
        if self.eta_seconds is not None:
            out["estimated_remaining_seconds"] = float(self.eta_seconds)
        return out


class TrainerStatus:
    """POSTs Figures to Kubeflow Trainer's trainer status endpoint."""

    def __init__(
        self,
        url: str,
        ca_file: str | None = None,
        token_file: str | None = None,
        clock=time.monotonic,
        interval: float = MIN_INTERVAL,
    ):
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.clock, self.interval = clock, interval
        self.last: float | None = None
        self.sent = 0
        self.warned = False
        self.thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, rank: int) -> TrainerStatus | None:
        """Rank 0's reporter when the Trainer gave the pod an endpoint; None otherwise."""
        url = os.environ.get(URL_ENV)
        if rank != 0 or not url:
            return None
        return cls(url, os.environ.get(CA_ENV), os.environ.get(TOKEN_ENV))

    @staticmethod
    def payload(figures: Figures) -> dict:
        status: dict = {
            "progressPercentage": figures.percent,
            "metrics": [
                {"name": "loss", "value": f"{figures.loss:.4f}"},
                {"name": "tokens_per_second", "value": f"{figures.tokens_per_second:.0f}"},
                {"name": "step", "value": f"{figures.step}/{figures.steps}"},
            ],
            "lastUpdatedTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if figures.eta_seconds is not None:
            status["estimatedRemainingSeconds"] = figures.eta_seconds
        return {"trainerStatus": status}

    def report(self, figures: Figures, force: bool = False) -> bool:
        """Send `figures` unless one went less than 5 s ago (or one is still on its way);
        `force` (the last step) waits for that one and always sends. True when sent."""
        now = self.clock()
        busy = self.thread is not None and self.thread.is_alive()
        if not force and (busy or (self.last is not None and now - self.last < self.interval)):
            return False
        if busy and self.thread is not None:
            self.thread.join(TIMEOUT)
        self.last = now
        body = json.dumps(self.payload(figures)).encode()
        self.thread = threading.Thread(target=self._send, args=(body,), daemon=True)
        self.thread.start()
        if force:
            self.close()
        return True

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(TIMEOUT + 1)

    def _send(self, body: bytes) -> None:
        try:
            headers = {"Content-Type": "application/json"}
            if self.token_file:
                with open(self.token_file) as f:  # a projected token rotates: read it each time
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            context = None
            if self.url.startswith("https://"):
                context = ssl.create_default_context(cafile=self.ca_file or None)
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
                response.read()
            self.sent += 1
        except Exception as exc:  # progress is a convenience: never fail training over it
            if not self.warned:
                self.warned = True
                print(
                    f"trainer status: {self.url}: {exc.__class__.__name__}: {exc}; training "
                    "goes on without reporting its progress there",
                    file=sys.stderr,
                    flush=True,
                )
