"""The merge_adapter step: `merge_adapter(cfg, adapter_dir, output_dir) -> summary`."""

from .step import merge_adapter

__all__ = ["merge_adapter"]
