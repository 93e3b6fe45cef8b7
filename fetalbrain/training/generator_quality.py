"""Quality against compute while a generator trains: is another hour of training worth it?

Every ``every_n_generator_steps`` generator steps (and at the first and last), the EMA generator draws the same
noise for as many images per class as the real validation part holds, and a real-only classifier of the same
split judges them in its own feature space (Inception's weights cannot be had offline, and say little about
ultrasound):

* FID and KID against the real training images, beside the same scores of the real validation images (the
  real-vs-real scale: a generator cannot be asked to beat two independent real samples);
* k-NN precision (do samples look like real images?) and recall (do they cover the real variety?),
  Kynkäänniemi et al. 2019, with validation's scores as the scale;
* OOD acceptance: the share of samples the classifier run's out-of-distribution detector accepts as fetal
  brain ultrasound (by construction it keeps ``keep_in_distribution`` of real validation images);
* classification accuracy score (CAS, Ravuri & Vinyals 2019): does the classifier call a "Mild
  ventriculomegaly" sample mild ventriculomegaly? Balanced over classes, beside its score on real validation;
* memorisation: the share of samples closer to a training image than 5 % of real validation images are, in
  intensity-normalised pixels and in features (independent images give 0.05).

Each evaluation adds a row to ``quality_curve.csv`` (with the CPU-hours, wall-hours and, on a GPU, GPU-hours
the training itself has used so far, evaluations excluded) and redraws ``quality_curve.png``; the loggers get
the same values. A resumed run continues the curve, and its clocks from the checkpoint (the callback's state).
The evaluations count against ``trainer.max_time``, though not in the clocks.
"""

import logging
import resource
import time
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import pandas as pd
import psutil
import torch
from omegaconf import OmegaConf

from fetalbrain.evaluation.ood import OODDetector, image_features, run_detector
from fetalbrain.evaluation.synthetic import fid_kid, knn_precision_recall, memorisation, pixel_vectors
from fetalbrain.models.classifier import load_classifier
from fetalbrain.models.gan import QUALITY_CURVE_CSV, QUALITY_CURVE_PNG
from fetalbrain.runs.checkpoints import run_directory
from fetalbrain.runs.integrity import verify_checkpoint
from fetalbrain.runs.layout import CONFIG_FILE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)
SPLIT_KEYS = ("splitter", "group_level", "num_folds", "fold", "val_num_folds", "split_seed")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads, and of its children: the finished ones (reaped) and
    the live ones (persistent data-loader workers, which would otherwise count only once they exit)."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            live += times.user + times.system
        except psutil.Error:  # exited meanwhile: counted in the reaped children once waited for
            continue
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + live


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the share predicted as that class."""
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


class GeneratorQuality(L.Callback):
    """Score the EMA generator during training (see the module docstring); off when ``classifier`` is null."""

    def __init__(
        self,
        classifier: str | None = None,
        every_n_generator_steps: int = 200,
        knn_k: int = 3,
        kid_subset_size: int = 50,
        kid_subsets: int = 50,
        percentile: float = 5.0,
        pixel_size: int = 32,
        seed: int = 0,
        verify: bool = True,
        goals: dict | None = None,
    ):
        if every_n_generator_steps < 1:
            raise ValueError(f"callbacks.generator_quality.every_n_generator_steps={every_n_generator_steps}: >= 1")
        self.classifier_path = Path(classifier).expanduser() if classifier else None
        self.every = int(every_n_generator_steps)
        self.knn_k, self.kid_subset_size, self.kid_subsets = int(knn_k), int(kid_subset_size), int(kid_subsets)
        self.percentile, self.pixel_size, self.seed, self.verify = float(percentile), int(pixel_size), seed, verify
        self.goals = dict(OmegaConf.to_container(goals) if OmegaConf.is_config(goals) else goals or {})
        self.active = False
        self.rows: list[dict] = []
        self.restored: dict | None = None  # the clocks of a resumed run, from its checkpoint

    # ---- set-up -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, gan: L.LightningModule) -> None:
        if self.classifier_path is None:
            log.info(
                "No quality curve: set callbacks.generator_quality.classifier=CKPT (a real-only classifier of "
                "this split) to score the generator while it trains"
            )
            return
        if not trainer.is_global_zero:
            return
        if trainer.datamodule is None:
            log.warning("No quality curve: the generator was given no DataModule, so there is no real set to compare")
            return
        path = self.classifier_path
        if not path.is_file():
            raise FileNotFoundError(f"callbacks.generator_quality.classifier={path}: no such checkpoint")
        verify_checkpoint(path, self.verify)
        self.classifier = load_classifier(path)
        datamodule = trainer.datamodule
        names = list(gan.hparams.class_names)
        if list(self.classifier.hparams.class_names) != names:
            raise ValueError(
                f"callbacks.generator_quality.classifier={path} was trained on other classes: "
                f"{list(self.classifier.hparams.class_names)} vs the generator's {names}"
            )
        self._check_same_split(path, datamodule)
        self.run_dir = Path(trainer.default_root_dir)
        real_train, _ = datamodule.preprocessed_images("train")  # what the generator learns from, at its size
        real_val, val_targets = datamodule.preprocessed_images("val")
        self.train_features = image_features(self.classifier, real_train, tta=False)[0]
        self.train_pixels = pixel_vectors(real_train, self.pixel_size)
        val_features, val_logits = image_features(self.classifier, real_val, tta=False)
        self.val_features, self.val_pixels = val_features, pixel_vectors(real_val, self.pixel_size)
        self.detector = self._detector(path)
        self.labels = torch.as_tensor(np.sort(val_targets), dtype=torch.long)  # validation's class mix
        self.noise = torch.randn(
            len(self.labels), gan.hparams.latent_dim, generator=torch.Generator().manual_seed(self.seed)
        )
        self.reference = {
            **self._distribution_scores(val_features),
            "ood_acceptance": self._accepted(val_features),
            "cas": balanced_accuracy(val_logits.argmax(1), np.asarray(val_targets)),
            "memorised_pixels": self.percentile / 100,
            "memorised_features": self.percentile / 100,
        }
        self.rows = [r for r in self._earlier_rows() if r["generator_step"] <= gan.generator_steps]
        self.train_cpu, self.train_wall = 0.0, 0.0
        if self.restored:  # resumed: the clocks go on from the checkpoint's
            self.train_cpu, self.train_wall = self.restored["cpu_seconds"], self.restored["wall_seconds"]
        elif self.rows:  # a checkpoint from before the clocks were saved: the last point's
            self.train_cpu, self.train_wall = self.rows[-1]["cpu_hours"] * 3600, self.rows[-1]["wall_hours"] * 3600
        self.cpu_mark, self.wall_mark = cpu_seconds(), time.perf_counter()
        self.active = True
        log.info("Quality curve every %d generator steps: %d samples scored by %s", self.every, len(self.labels), path)

    # ---- the clocks in the checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.active:
            return {}
        return {
            "cpu_seconds": self.train_cpu + cpu_seconds() - self.cpu_mark,
            "wall_seconds": self.train_wall + time.perf_counter() - self.wall_mark,
        }

    def load_state_dict(self, state_dict: dict) -> None:  # before on_fit_start when a run resumes
        self.restored = dict(state_dict) if state_dict else None

    def _check_same_split(self, path: Path, datamodule) -> None:
        config = run_directory(path) / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"{config}: needed to check the quality classifier was trained on this split")
        theirs, ours = OmegaConf.load(config).data, datamodule.hparams
        differ = [f"data.{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in SPLIT_KEYS if theirs.get(k) != ours.get(k)]
        val_predictions = run_directory(path) / "val_predictions.csv"
        if not differ and val_predictions.is_file():  # the exact check: the same validation images
            judged = set(pd.read_csv(val_predictions)["path"])
            if judged != set(datamodule.part_table("val")["path"]):
                differ.append(f"another validation part ({len(judged)} images in {val_predictions.name})")
        if differ or theirs.get("mix", "real") != "real":
            raise ValueError(
                f"callbacks.generator_quality.classifier={path} must be a real-only classifier of the generator's "
                f"split (its validation images are the real-vs-real scale): {'; '.join(differ) or 'not data.mix=real'}"
            )

    def _detector(self, path: Path) -> OODDetector | None:
        detector, status = run_detector(path, feature_dim=self.train_features.shape[1])
        if detector is None:
            log.warning("OOD detector of %s: %s. The quality curve has no OOD acceptance", path, status)
        return detector

    def _earlier_rows(self) -> list[dict]:
        file = self.run_dir / QUALITY_CURVE_CSV
        return pd.read_csv(file).to_dict("records") if file.is_file() else []

    # ---- scores -------------------------------------------------------------------------------------------
    def _distribution_scores(self, features: np.ndarray) -> dict:
        distance = fid_kid(self.train_features, features, self.kid_subset_size, self.kid_subsets, self.seed)
        coverage = knn_precision_recall(self.train_features, features, k=self.knn_k)
        scores = {"fid": distance["fid"], "kid": distance["kid_mean"]}
        return scores | {k: coverage[k] for k in ("precision", "recall")}

    def _accepted(self, features: np.ndarray) -> float:
        if self.detector is None:
            return float("nan")
        return float(np.mean(~self.detector.flag(self.detector.score(features))))

    def evaluate(self, trainer: L.Trainer, gan) -> dict:
        now_cpu, now_wall = cpu_seconds(), time.perf_counter()
        self.train_cpu += now_cpu - self.cpu_mark
        self.train_wall += now_wall - self.wall_mark
        images = list(gan.ema_images(self.noise, self.labels.to(gan.device)))
        features, logits = image_features(self.classifier, images, tta=False)
        labels = self.labels.numpy()
        pixels = pixel_vectors(images, self.pixel_size)
        memorised = {
            space: memorisation(train, fake, reference=val, percentile=self.percentile)["fraction_below"]
            for space, train, fake, val in (
                ("pixels", self.train_pixels, pixels, self.val_pixels),
                ("features", self.train_features, features, self.val_features),
            )
        }
        on_gpu = trainer.strategy.root_device.type == "cuda"
        row = {
            "generator_step": int(gan.generator_steps),
            "critic_step": int(gan.critic_steps),
            "epoch": int(trainer.current_epoch),
            "cpu_hours": self.train_cpu / 3600,
            "wall_hours": self.train_wall / 3600,
            "gpu_hours": self.train_wall / 3600 * trainer.num_devices if on_gpu else 0.0,
            **self._distribution_scores(features),
            "ood_acceptance": self._accepted(features),
            "cas": balanced_accuracy(logits.argmax(1), labels),
            "memorised_pixels": memorised["pixels"],
            "memorised_features": memorised["features"],
            **{f"reference_{k}": v for k, v in self.reference.items()},
        }
        row["evaluation_seconds"] = round(time.perf_counter() - now_wall, 2)
        self.rows = [r for r in self.rows if r["generator_step"] < row["generator_step"]] + [row]
        pd.DataFrame(self.rows).to_csv(self.run_dir / QUALITY_CURVE_CSV, index=False)
        self.plot(self.run_dir / QUALITY_CURVE_PNG)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"quality/{k}": float(v) for k, v in row.items() if k not in ("epoch",)}, step=trainer.global_step
            )
        self.cpu_mark, self.wall_mark = cpu_seconds(), time.perf_counter()  # the evaluation is not training
        return row

    # ---- hooks --------------------------------------------------------------------------------------------
    def _due(self, gan) -> bool:
        """Not yet scored at this generator step (the rows are in step order: the last one is the newest)."""
        return self.active and (not self.rows or self.rows[-1]["generator_step"] != gan.generator_steps)

    def on_train_start(self, trainer, gan) -> None:
        if self._due(gan):
            self.evaluate(trainer, gan)  # the untrained (or resumed) generator: where the curve starts

    def on_train_batch_end(self, trainer, gan, outputs, batch, batch_idx) -> None:
        if self.active and gan.generator_steps % self.every == 0 and self._due(gan):
            self.evaluate(trainer, gan)

    def on_train_end(self, trainer, gan) -> None:
        if self._due(gan):
            self.evaluate(trainer, gan)

    # ---- the figure ---------------------------------------------------------------------------------------
    def plot(self, path: Path) -> Path:
        return plot_quality_curve(pd.DataFrame(self.rows), path, self.goals)


PANELS = (  # (title, columns, goal key, goal as a multiple of the reference?)
    ("FID (lower is better)", ("fid",), "fid_ratio", True),
    ("k-NN precision / recall", ("precision", "recall"), None, False),
    ("OOD detector accepts", ("ood_acceptance",), "ood_acceptance", False),
    ("classification accuracy score", ("cas",), None, False),
    ("memorised (closer than real neighbours)", ("memorised_pixels", "memorised_features"), None, False),
    ("KID (lower is better)", ("kid",), None, False),
)


def plot_quality_curve(curve: pd.DataFrame, path: Path, goals: dict | None = None) -> Path:
    """Each score against the training's compute (GPU-hours when there were any, else CPU-hours), with its
    real-vs-real reference dashed and the goal dotted."""
    goals = goals or {}
    clock = "gpu_hours" if curve["gpu_hours"].max() > 0 else "cpu_hours"
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, columns, goal_key, relative) in zip(axes.flat, PANELS):
        for column, colour in zip(columns, ("tab:blue", "tab:orange")):
            ax.plot(curve[clock], curve[column], marker="o", markersize=3, color=colour, label=column)
            ax.axhline(
                curve[f"reference_{column}"].iloc[-1],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=f"{column}, real validation",
            )
        for column in columns:
            goal = goals.get(goal_key or column)
            if goal is not None:
                value = goal * curve[f"reference_{column}"].iloc[-1] if relative else goal
                ax.axhline(value, color="tab:green", linestyle=":", linewidth=1.2, label=f"goal {column}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(clock.replace("_", "-"))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    last = curve.iloc[-1]
    fig.suptitle(
        f"Generator quality against compute: {int(last['generator_step'])} generator steps, "
        f"{last['cpu_hours']:.2f} CPU-hours, {last['wall_hours']:.2f} wall-hours",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
