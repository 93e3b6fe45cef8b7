"""A trained run, or several, used as a model: ``predictor.Predictor`` (a checkpoint or its ONNX export, with its
run's preprocessing, temperature, thresholds, OOD detector and Grad-CAM) and ``ensemble.Ensemble`` (several runs as
one, with the same interface); ``ensemble.load_model`` picks one from what a user passes as ``ckpt``."""
