"""push_model: copy a finished model to S3 or a folder with checksums and a manifest written last."""

from .step import pull, push

__all__ = ["pull", "push"]
