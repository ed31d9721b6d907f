"""compare_methods: one table and HTML report over the branches of `kubetune compare`
(step.py), and the settings each branch trains with (settings.py). Nothing is imported here:
the recipe's validation reads settings.py without loading torch."""
