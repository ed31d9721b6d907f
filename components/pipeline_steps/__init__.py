"""The pipeline's first step, resolve_recipe (component.py, bodies.py), and the one definition
of the run's parameters (bodies.PIPELINE_FIELDS). The package keeps its name because compiled
pipelines import `kubetune.components.pipeline_steps.bodies` from the steps image."""
