"""The fetch_model step: `fetch_model(model_cfg, workspace) -> record | None`."""

from .step import fetch_model, fetch_summary, fetched_config

__all__ = ["fetch_model", "fetch_summary", "fetched_config"]
