"""The backends of `kubetune train` (base.py: one interface, `training_backend(cfg)`): local.py
runs torchrun here; kubernetes.py runs the worker as a Kubeflow PyTorchJob (pytorchjob.py
renders it) or Trainer v2 TrainJob (trainjob.py), both from the training pod pieces in pod.py,
through the API client in kube_api.py (which `kubetune deploy` uses for KServe too). The torchrun
worker never imports this package.

A new backend (Ray, SkyPilot): a module with a class that has base.py's `launch`, and its line in
`training_backend`; a KFP task's passthrough settings and job name reach it as arguments."""
