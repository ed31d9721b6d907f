"""The fetch_model step (step.py): `fetch_model(model_cfg, workspace) -> record | None`.
Nothing is imported here, so compiling a pipeline (component.py) stays light."""
