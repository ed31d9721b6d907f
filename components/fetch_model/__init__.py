"""The fetch step (`kubetune fetch-model`; step.py): `fetch(model_cfg, workspace) -> record |
None`. Nothing is imported here, so compiling a pipeline (component.py) stays light."""
