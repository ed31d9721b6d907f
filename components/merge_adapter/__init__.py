"""The merge_adapter step (step.py): `merge_adapter(cfg, adapter_dir, output_dir) -> summary`.
Nothing is imported here, so compiling a pipeline (component.py) does not load torch."""
