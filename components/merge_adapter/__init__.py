"""The merge step (`kubetune merge`; step.py): `merge(cfg, adapter_dir, output_dir) -> summary`.
Nothing is imported here, so compiling a pipeline (component.py) does not load torch."""
