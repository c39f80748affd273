"""Experiments, kept out of the library core: the built-in test problems
(:mod:`~hpcqn.experiments.problems`), the digits models and their training loop
(:mod:`~hpcqn.experiments.training`, needs torch and scikit-learn) and the job files
that ``hpcqn run`` executes (:mod:`~hpcqn.experiments.jobs`)."""
