"""What the k-NN OOD score adds to the prediction of one image, at each model's feature size."""


def ood_score_speed(feature_dims: dict[str, int], train_images: int, k: int) -> list[dict]:
    """Milliseconds to score one image with the k-NN OOD detector (the forward pass that gives the features is the
    model's), fitted on ``train_images`` features of each model's penultimate size: the cost depends on those two
    sizes only, so random unit vectors stand in for real features."""
    import numpy as np

    from fetalbrain.evaluation.ood import OODDetector, score_time_ms

    rng, results = np.random.default_rng(0), []
    for model, dim in feature_dims.items():
        features = rng.standard_normal((train_images, dim)).astype(np.float32)
        detector = OODDetector.fit("knn", features, np.zeros(train_images, int), k=k)
        results.append(
            {"model": model, "feature_dim": dim, "train_images": train_images, "ms": score_time_ms(detector, features)}
        )
    return results
