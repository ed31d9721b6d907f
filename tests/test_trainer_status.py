"""The progress reporter (components/train/status.py) against a loopback trainer status
server as strict as Trainer's (HTTPS from a generated CA, the job's path, the pod's token): the
payload is what Trainer v2.3's API models parse without loss, updates come at most every 5 s
(the last always), nothing is sent without the endpoint's env (Trainer's own names), and a
failing or refusing endpoint never fails training. The real worker sending them runs in
test_kubernetes.py's pod command test."""

from __future__ import annotations

import pytest

from kubetune.components.train.status import Figures, TrainerStatus

from .k8s_schemas import _lost
from .status_server import StatusServer


@pytest.fixture
def server(tmp_path):
    s = StatusServer(tmp_path)
    yield s
    s.close()


def reporter(server, **kwargs) -> TrainerStatus:
    return TrainerStatus(server.url, str(server.ca), str(server.token_file), **kwargs)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def figures(step: int, steps: int = 200) -> Figures:
    return Figures.of(step, steps, start=0, loss=1.23456, tokens=51200.0 * step, elapsed=2.0 * step)


def test_figures():
    f = figures(50)
    assert (f.percent, f.eta_seconds, f.tokens_per_second) == (25, 300, 25600.0)
    assert f.eta() == "5m00s"
    resumed = Figures.of(150, 200, start=100, loss=1.0, tokens=1000.0, elapsed=100.0)
    assert resumed.eta_seconds == 100  # this process's speed, not the run's since step 0
    assert Figures.of(100, 200, start=100, loss=1.0, tokens=0.0, elapsed=0.0).eta_seconds is None


def test_payload_is_trainer_apis_update_request(server):
    from kubeflow_trainer_api.models import TrainerV1alpha1UpdateTrainJobStatusRequest

    status = reporter(server)
    assert status.report(figures(50))
    status.close()
    (post,) = server.posts
    assert post["headers"]["Authorization"] == "Bearer projected-sa-token"
    assert post["headers"]["Content-Type"] == "application/json"
    body = post["body"]
    parsed = TrainerV1alpha1UpdateTrainJobStatusRequest.from_dict(body)
    lost = _lost(body, parsed.to_dict(), "")
    assert [e for e in lost if not e.startswith("trainerStatus.lastUpdatedTime:")] == []
    assert _same_instant(body, parsed)
    trainer = body["trainerStatus"]
    assert trainer["progressPercentage"] == 25 and trainer["estimatedRemainingSeconds"] == 300
    metrics = {m["name"]: m["value"] for m in trainer["metrics"]}
    assert metrics == {"loss": "1.2346", "tokens_per_second": "25600", "step": "50/200"}


def _same_instant(body, parsed) -> bool:
    """The models turn lastUpdatedTime into a datetime: the same instant, in UTC."""
    from datetime import datetime

    sent = datetime.fromisoformat(body["trainerStatus"]["lastUpdatedTime"].replace("Z", "+00:00"))
    return parsed.trainer_status.last_updated_time == sent


def test_at_most_one_update_per_5_seconds_and_the_last_always(server):
    clock = Clock()
    status = reporter(server, clock=clock)
    sent = []
    for at, step in ((0, 10), (2, 20), (4.9, 30), (5.0, 40), (9.9, 50), (10.5, 60)):
        clock.now = 100.0 + at
        sent.append(status.report(figures(step)))
        status.close()  # let each send land: the test checks the throttle, not the thread
    clock.now += 0.1
    sent.append(status.report(figures(200), force=True))
    assert sent == [True, False, False, True, False, True, True]
    steps = [p["body"]["trainerStatus"]["metrics"][2]["value"] for p in server.posts]
    assert steps == ["10/200", "40/200", "60/200", "200/200"]
    assert server.posts[-1]["body"]["trainerStatus"]["progressPercentage"] == 100
    assert server.posts[-1]["body"]["trainerStatus"]["estimatedRemainingSeconds"] == 0


def test_nothing_without_the_endpoint(monkeypatch, server):
    for key in server.env():
        monkeypatch.delenv(key, raising=False)
    assert TrainerStatus.from_env(rank=0) is None
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    assert TrainerStatus.from_env(rank=1) is None  # only rank 0 reports
    status = TrainerStatus.from_env(rank=0)
    assert status is not None and status.url == server.url
    assert server.posts == []
    status.report(figures(200), force=True)  # Trainer's names are all it needs
    assert status.sent == 1 and len(server.posts) == 1


def test_a_failing_endpoint_never_fails_training(server, capsys):
    server.answers = [500, 403]
    status = reporter(server, interval=0)
    for step in (1, 2, 3):
        assert status.report(figures(step))
        status.close()
    assert len(server.posts) == 3 and status.sent == 1
    err = capsys.readouterr().err
    assert err.count("trainer status:") == 1 and "HTTP Error 500" in err
    dead = TrainerStatus("http://127.0.0.1:9/nothing", token_file=str(server.token_file))
    dead.report(figures(1), force=True)  # connection refused: warned, not raised
    missing = TrainerStatus(server.url, str(server.ca), str(server.token_file.parent / "gone"))
    missing.report(figures(1), force=True)  # no token file: warned, not raised
    assert dead.sent == missing.sent == 0


def test_the_server_refuses_what_trainers_refuses_and_training_goes_on(server, capsys):
    """A wrong token, another job's path, an untrusted certificate: refused or not connected,
    one warning each, never an exception."""
    (server.token_file.parent / "other-token").write_text("someone-else\n")
    cases = {
        "token": TrainerStatus(
            server.url, str(server.ca), str(server.token_file.parent / "other-token")
        ),
        "path": TrainerStatus(
            server.url.replace("kt-run", "other"), str(server.ca), str(server.token_file)
        ),
        "ca": TrainerStatus(server.url, None, str(server.token_file)),  # the system's CAs
    }
    for status in cases.values():
        status.report(figures(1), force=True)
        assert status.sent == 0
    assert server.posts == []
    assert sorted(code for code, _ in server.refused) == [401, 404]
    err = capsys.readouterr().err
    assert err.count("trainer status:") == 3 and "CERTIFICATE_VERIFY_FAILED" in err
