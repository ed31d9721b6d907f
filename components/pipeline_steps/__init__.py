"""What the KFP components of the fine-tuning pipeline call: one function per component, each
turning the component's inputs into a call of a step (prepare, train, merge, evaluate, push)."""
