"""Serving a pushed model: the KServe InferenceService (render.py)."""
