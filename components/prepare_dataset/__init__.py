"""The prepare_dataset step (step.py): `prepare_dataset(cfg, output_dir) -> stats`.
Nothing is imported here, so compiling a pipeline (component.py) stays light."""
