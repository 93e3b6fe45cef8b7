"""A study, declared before it runs: ``experiments/<name>/study.yaml``.

The file names the conditions (override sets of ``fetalbrain.train``), the overrides they share, the seeds, the
folds and split seeds of repeated grouped cross-validation (or none: the data's own split), the **primary
endpoint** and the secondary ones, the baseline condition, what is chosen on validation, published numbers to
test against, and the bootstrap. ``experiments/reproduction/study.yaml`` is an example; docs/evaluation.md
describes every key.
"""

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fetalbrain.project import PROJECT_ROOT
from fetalbrain.studies.statistics import METRICS

STUDY_FILE = "study.yaml"
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
KEYS = {
    "description",
    "conditions",
    "overrides",
    "seeds",
    "folds",
    "split_seeds",
    "primary",
    "secondary",
    "baseline",
    "select",
    "published",
    "bootstrap",
    "runs",
    "run_metrics",
}


class StudyError(ValueError):
    """A study file that cannot be run as written, or a request the study protocol refuses."""


@dataclass
class Selection:
    """What the summariser chooses, always on validation predictions."""

    part: str = "val"  # the predictions choices are made on
    metric: str = "f1_macro"
    ensembles: list[int] = field(default_factory=list)  # sizes of ensembles over conditions, e.g. [2]
    per_fold: bool = False  # nested: each outer fold (and replicate) takes the condition best on its validation part


@dataclass
class Study:
    name: str
    folder: Path  # experiments/<name>: README.md, study.yaml, results/
    conditions: dict[str, list[str]]
    overrides: list[str]
    seeds: list[int]
    folds: int | None  # grouped cross-validation folds; None: the data's own split (data.split=...)
    split_seeds: list[int] | None
    primary: str
    secondary: list[str]
    baseline: str
    select: Selection
    published: dict[str, dict[str, float]]  # condition -> {metric: value}
    bootstrap: dict
    runs: Path  # where the run folders go
    description: str = ""
    run_metrics: list[str] = field(default_factory=list)  # metrics.json keys tabled per condition (mean, min, max)

    @property
    def results(self) -> Path:
        return self.folder / "results"

    @property
    def endpoints(self) -> list[str]:
        return [self.primary, *[m for m in self.secondary if m != self.primary]]

    def grid(self, condition: str) -> list[str]:
        """The multirun overrides of one condition: shared overrides, the condition's, and its sweep."""
        sweep = [f"seed={','.join(map(str, self.seeds))}"]
        if self.folds:
            sweep += [
                "data/split=grouped",
                f"data.num_folds={self.folds}",
                f"data.fold={','.join(map(str, range(self.folds)))}",
                f"data.split_seed={','.join(map(str, self.split_seeds))}",
            ]
        return [*self.overrides, *self.conditions[condition], *sweep]

    def jobs_per_condition(self) -> int:
        return len(self.seeds) * (self.folds or 1) * len(self.split_seeds or [None])


def study_path(name: str | Path) -> Path:
    """``NAME`` (a folder of experiments/), a study folder, or a study file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    if path.is_dir():
        return path / STUDY_FILE
    return EXPERIMENTS_DIR / str(name) / STUDY_FILE


def _list(value, key: str, path: Path, kind=str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        value = [value]
    if not all(isinstance(v, kind) for v in value):
        raise StudyError(f"{path}: {key} must be a list of {kind.__name__} values, got {list(value)!r}")
    return list(value)


def load_study(name: str | Path, runs_dir: str | Path | None = None) -> Study:
    """Read and check a study file; every error names the file and the key."""
    path = study_path(name)
    if not path.is_file():
        known = sorted(p.parent.name for p in EXPERIMENTS_DIR.glob(f"*/{STUDY_FILE}"))
        raise StudyError(f"{path}: no study file. Studies: {', '.join(known) or 'none'}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as error:
        raise StudyError(f"{path}: not a readable YAML study file ({error})") from error
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping of keys ({', '.join(sorted(KEYS))})")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    conditions = raw.get("conditions")
    if not isinstance(conditions, dict) or not conditions:
        raise StudyError(f"{path}: conditions must map each condition's name to its list of overrides")
    conditions = {str(c): _list(o, f"conditions.{c}", path) for c, o in conditions.items()}
    for c in conditions:
        if "/" in c or c.startswith("."):
            raise StudyError(f"{path}: conditions.{c}: a name without '/' (it names a folder)")
    for key in ("primary", "baseline", "seeds"):
        if raw.get(key) in (None, [], ""):
            raise StudyError(f"{path}: {key} is required (declare it before the study runs)")
    primary = raw["primary"]
    secondary = _list(raw.get("secondary"), "secondary", path)
    for metric in [primary, *secondary]:
        if metric not in METRICS:
            raise StudyError(f"{path}: endpoint {metric!r} unknown; choose from {', '.join(METRICS)}")
    baseline = str(raw["baseline"])
    if baseline not in conditions:
        raise StudyError(f"{path}: baseline={baseline!r} is not a condition ({', '.join(conditions)})")
    folds = raw.get("folds")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise StudyError(f"{path}: folds={folds!r}: a whole number of at least 2, or null for the data's own split")
    split_seeds = _list(raw.get("split_seeds"), "split_seeds", path, int) or None
    if folds and not split_seeds:
        raise StudyError(f"{path}: folds={folds} needs split_seeds (one per repetition of the cross-validation)")
    chosen = raw.get("select") or {}
    known = set(Selection.__dataclass_fields__)
    if not isinstance(chosen, dict) or set(map(str, chosen)) - known:
        raise StudyError(f"{path}: select must be a mapping of {', '.join(sorted(known))}; got {chosen!r}")
    select = Selection(**chosen)
    check_selection(select, str(path))
    published = raw.get("published") or {}
    for condition, numbers in published.items():
        if condition not in conditions or not isinstance(numbers, dict) or set(numbers) - {"accuracy"}:
            raise StudyError(
                f"{path}: published.{condition}: a condition's published {{accuracy: value}} (tested by the exact "
                "binomial test)"
            )
    bootstrap = {"samples": 1000, "seed": 0, "confidence": 0.95, **(raw.get("bootstrap") or {})}
    if not isinstance(bootstrap["samples"], int) or bootstrap["samples"] < 0 or not 0 < bootstrap["confidence"] < 1:
        raise StudyError(f"{path}: bootstrap needs samples >= 0 and 0 < confidence < 1, got {bootstrap}")
    runs = Path(runs_dir or raw.get("runs") or PROJECT_ROOT / "outputs" / "study" / path.parent.name / "runs")
    return Study(
        name=path.parent.name,
        folder=path.parent,
        conditions=conditions,
        overrides=_list(raw.get("overrides"), "overrides", path),
        seeds=_list(raw["seeds"], "seeds", path, int),
        folds=folds,
        split_seeds=split_seeds,
        primary=primary,
        secondary=secondary,
        baseline=baseline,
        select=select,
        published=published,
        bootstrap=bootstrap,
        runs=runs if runs.is_absolute() else PROJECT_ROOT / runs,
        description=str(raw.get("description", "")),
        run_metrics=_list(raw.get("run_metrics"), "run_metrics", path),
    )


def check_selection(select: Selection, where: str) -> None:
    """Choices are made on validation predictions only: ranking on test is refused."""
    if select.part != "val":
        raise StudyError(
            f"{where}: select.part={select.part!r}: a study chooses (presets, ensembles, harmonisation, thresholds) on "
            "validation predictions only; ranking on test scores is refused"
        )
    if select.metric not in METRICS:
        raise StudyError(f"{where}: select.metric={select.metric!r} unknown; choose from {', '.join(METRICS)}")
    if any(not isinstance(s, int) or s < 2 for s in select.ensembles):
        raise StudyError(f"{where}: select.ensembles={select.ensembles!r}: ensemble sizes of at least 2")
