"""Run a declared study, then summarise it: ``python -m fetalbrain.study NAME [OVERRIDES] [--summarise]``.

NAME is a folder of ``experiments/`` with a ``study.yaml`` (or a path to one): the conditions, seeds, folds and
split seeds, the primary endpoint, the baseline and what is chosen on validation (``fetalbrain.studies.spec``).
Without ``--summarise`` each condition's grid runs as one Hydra multirun of ``fetalbrain.train`` into
``<runs>/<condition>/`` (OVERRIDES such as ``hydra/launcher=local_parallel`` go to every multirun); a killed study
started again skips finished jobs and continues unfinished ones, and a condition whose runs are all finished is not
launched again. Then, and with ``--summarise`` alone, the summariser writes ``experiments/NAME/results/`` (pooled
out-of-fold endpoints with case-bootstrap intervals, per-class recall, paired comparisons with the corrected
resampled t-test, validation choices, ensembles, published-number tests) and fills the generated blocks of
``experiments/NAME/README.md``.
"""

import argparse
import logging
import subprocess
import sys

from fetalbrain.studies.collect import collect_runs, missing_jobs
from fetalbrain.studies.readme import summary_markdown, write_readme
from fetalbrain.studies.spec import Study, StudyError, load_study
from fetalbrain.studies.summarise import summarise

log = logging.getLogger("fetalbrain.study")

EXAMPLES = """examples:
  python -m fetalbrain.study reproduction                      # run what is left of the study, then summarise
  python -m fetalbrain.study reproduction hydra/launcher=local_parallel hydra.launcher.max_parallel=2
  python -m fetalbrain.study reproduction --summarise          # results/ and README blocks from finished runs
  python -m fetalbrain.study reproduction --dry-run            # the multirun commands, nothing run
  python -m fetalbrain.study path/to/study.yaml --runs outputs/study/mine/runs

read more: docs/evaluation.md ("Studies")"""


def launch_commands(study: Study, overrides: list[str]) -> dict[str, list[str]]:
    """The multirun command of each condition whose grid is not finished."""
    try:
        missing = missing_jobs(study, collect_runs(study))
    except StudyError:  # no runs yet
        missing = {c: study.jobs_per_condition() for c in study.conditions}
    commands = {}
    for condition, left in missing.items():
        if left <= 0:
            log.info("%s: all %d jobs finished", condition, study.jobs_per_condition())
            continue
        commands[condition] = [
            sys.executable,
            "-m",
            "fetalbrain.train",
            "-m",
            *study.grid(condition),
            *overrides,
            f"hydra.sweep.dir={study.runs / condition}",
        ]
    return commands


def write_results(study: Study) -> None:
    tables = summarise(study)
    study.results.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(study.results / f"{name}.csv", index=False, float_format="%.4f")
    (study.results / "summary.md").write_text(summary_markdown(study.name, study.results))
    readme = study.folder / "README.md"
    blocks = write_readme(readme, study.results) if readme.is_file() else []
    print(f"Results: {study.results} ({', '.join(sorted(tables))}); README blocks: {', '.join(blocks) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fetalbrain.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("study", help="a study of experiments/ (its folder name), or a study.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every multirun (launcher, trainer, ...)")
    parser.add_argument("--summarise", action="store_true", help="only summarise the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the multirun commands, run nothing")
    parser.add_argument("--runs", help="the study's run folder (default outputs/study/NAME/runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        study = load_study(args.study, args.runs)
        if not args.summarise:
            for condition, command in launch_commands(study, args.overrides).items():
                print(f"{condition}: {' '.join(command[1:])}", flush=True)
                if not args.dry_run and subprocess.run(command).returncode != 0:
                    print(
                        f"fetalbrain.study: the multirun of {condition} failed (see its log above); start the "
                        "study again to continue where it stopped",
                        file=sys.stderr,
                    )
                    return 1
            if args.dry_run:
                return 0
        write_results(study)
    except StudyError as error:
        print(f"fetalbrain.study: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
