"""The train step: the torchrun worker and its launchers."""
