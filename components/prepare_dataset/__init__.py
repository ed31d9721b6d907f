"""The prepare step (`kubetune prepare`; step.py): `prepare(cfg, output_dir) -> stats`.
Nothing is imported here, so compiling a pipeline (component.py) stays light."""
