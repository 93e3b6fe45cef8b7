"""Evaluate a trained classifier on any dataset with the choices its run made on its own validation part:
``scoring`` (every number the labels allow, with bootstrap intervals), ``report`` (the files) and ``markdown``
(report.md). The command is ``python -m fetalbrain.evaluate``."""
