"""The prepare_dataset step: `prepare_dataset(cfg, output_dir) -> stats`."""

from .step import prepare_dataset

__all__ = ["prepare_dataset"]
