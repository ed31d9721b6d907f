"""The train step: step.py (checks, then the backend ../backends/ names) and the torchrun
worker (worker.py; entry.py is how the backends start it). Nothing is imported here, so the
worker starts light and never imports the Kubernetes side."""
