"""evaluate: loss, perplexity, ROUGE and exact match of the tuned (and base) model, and a report
(step.py); lm-evaluation-harness tasks (harness.py); vLLM generation (vllm_engine.py). Nothing is
imported here, so compiling a pipeline (component.py) does not load torch."""
