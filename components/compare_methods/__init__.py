"""compare_methods: one table and HTML report over the branches of `kubetune compare`."""

from .step import compare_methods

__all__ = ["compare_methods"]
