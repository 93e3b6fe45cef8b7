"""Evaluation: the test report of a run (tables, plots) and comparisons across runs."""
