"""push_model (step.py): copy a finished model to S3 or a folder with checksums and a manifest
written last. Nothing is imported here, so compiling a pipeline (component.py) stays light."""
