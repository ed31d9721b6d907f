"""`kubetune submit`: upload the recipe's pipeline to a KFP endpoint (a new version when the
pipeline exists), then start a run, or a recurring run for scheduled retraining, with
`kfp.Client`. Authentication is kfp.Client's own (in-cluster service account token via
KF_PIPELINES_SA_TOKEN_PATH, or `kfp` CLI credentials)."""

from __future__ import annotations

import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from kubetune.components.config import RunConfig
from kubetune.components.errors import UserError

# Training pods need the launcher's Role: runs execute as the `kubetune` ServiceAccount
# (manifests/base).
RUN_SERVICE_ACCOUNT = "kubetune"


def pipeline_name(cfg: RunConfig) -> str:
    model = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    return "kubetune-" + re.sub(r"[^a-z0-9-]+", "-", f"{model}-{cfg.method}".lower()).strip("-")


def _cron(schedule: str) -> str:
    fields = schedule.split()
    if len(fields) == 5:  # classic cron: KFP's has seconds first
        fields = ["0", *fields]
    if len(fields) != 6:
        raise UserError(
            f"--schedule {schedule!r}: a cron expression has 5 or 6 fields (KFP: seconds "
            "minutes hours day-of-month month day-of-week)"
        )
    return " ".join(fields)


def submit(
    cfg: RunConfig,
    host: str,
    experiment: str = "kubetune",
    schedule: str | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
) -> dict:
    import kfp

    from kubetune.pipelines.finetune import compile_pipeline

    cron = _cron(schedule) if schedule else None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = pipeline_name(cfg)
    try:
        client = kfp.Client(host=host, namespace=namespace)
        with tempfile.TemporaryDirectory() as folder:
            package = str(Path(folder) / "pipeline.yaml")
            compile_pipeline(cfg, package)
            exp = client.create_experiment(name=experiment, namespace=namespace)
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                pipeline = client.upload_pipeline(
                    package,
                    pipeline_name=name,
                    description=f"kubetune: {cfg.model.name_or_path} ({cfg.method})",
                    namespace=namespace,
                )
                pipeline_id = pipeline.pipeline_id
                versions = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
                version_id = versions[0].pipeline_version_id
            else:
                version = client.upload_pipeline_version(
                    package, pipeline_version_name=f"{name}-{stamp}", pipeline_id=pipeline_id
                )
                version_id = version.pipeline_version_id
            job = run_name or f"{name}-{stamp}"
            if cron:
                recurring = client.create_recurring_run(
                    experiment_id=exp.experiment_id,
                    job_name=job,
                    cron_expression=cron,
                    max_concurrency=1,  # a retraining never overlaps the previous one
                    pipeline_id=pipeline_id,
                    version_id=version_id,
                    enabled=True,
                    enable_caching=False,
                    service_account=RUN_SERVICE_ACCOUNT,
                )
                return {
                    "recurring_run": recurring.recurring_run_id,
                    "schedule": cron,
                    "pipeline": pipeline_id,
                    "version": version_id,
                    "experiment": exp.experiment_id,
                }
            run = client.run_pipeline(
                experiment_id=exp.experiment_id,
                job_name=job,
                pipeline_id=pipeline_id,
                version_id=version_id,
                enable_caching=False,
                service_account=RUN_SERVICE_ACCOUNT,
            )
            return {
                "run": run.run_id,
                "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
                "pipeline": pipeline_id,
                "version": version_id,
                "experiment": exp.experiment_id,
            }
    except UserError:
        raise
    except Exception as exc:  # kfp_server_api / urllib3 errors: say where and why, briefly
        status = getattr(exc, "status", None)
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        detail = f"HTTP {status} {reason}" if status else str(exc).splitlines()[0]
        raise UserError(f"KFP endpoint {host}: {detail}") from None
