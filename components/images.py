"""The image every pipeline step starts in unless the recipe names another
(`kubernetes.steps_image`, applied by the pipeline with set_container_image)."""

STEPS_IMAGE = "ghcr.io/kubetune/steps:0.1.0"
