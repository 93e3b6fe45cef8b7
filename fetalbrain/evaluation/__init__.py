"""Judging predictions: metrics (each named once), intervals, calibration, screening thresholds and plots; the test
report of a run and its checks (``checks.CHECKS``: calibration, screening, shortcut, per-class recall, nearest
neighbour, hierarchy, OOD detector, external normals); evaluation of a checkpoint on any dataset
(``any_dataset``); model cards; synthetic-image quality. It knows nets only as objects handed to it: models import
it, not the reverse."""
