"""The Kubernetes side of training: render a recipe as a PyTorchJob (Training Operator) or a
TrainJob and its ClusterTrainingRuntime (Trainer v2), create or adopt it, follow its conditions
and rank 0's log, retry API errors, delete it on cancel. The torchrun worker never imports this."""
