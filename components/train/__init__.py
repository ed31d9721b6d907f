"""The train step: step.py (checks, then torchrun here or a job through ../cluster/) and the
torchrun worker (worker.py). Nothing is imported here, so the worker starts light and never
imports the Kubernetes side."""
