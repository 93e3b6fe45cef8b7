"""Model cards: what a run's model is, what data and split it saw, how well it did, what it is not for.

``model_card.json``/``.md`` are built from the run directory alone and list the SHA256 of every
checkpoint; ``fetalbrain.runs.integrity`` checks a checkpoint against them before it is loaded, so the card's
numbers always describe the weights in use. Rewriting a card keeps those hashes: a changed checkpoint
is refused unless ``rehash`` says the new weights are accepted.

``python -m fetalbrain.card RUN_DIR [--write [--rehash]] [--folds DIR ...]`` prints the card, checks the
checkpoints against it and ``model_card.md``'s front matter (the Hub's metadata) against ``metrics.json``, offline.
"""

import argparse
import sys
from pathlib import Path

from fetalbrain.evaluation.model_card import CARD_MD, front_matter_problems, render_markdown, write_model_card
from fetalbrain.runs.integrity import CARD_JSON, CheckpointIntegrityError, check_checkpoints, read_card
from fetalbrain.runs.layout import SUMMARY_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fetalbrain.card",
        description="Print a run's model card (writing it when asked or missing); check its checkpoints and its "
        "front matter (the Hugging Face Hub's metadata), offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m fetalbrain.card outputs/runs/DATE/TIME                  # print the card, check checkpoints and metadata
  python -m fetalbrain.card RUN --write --folds outputs/multirun/DATE/TIME/{1,2,3,4}   # mean, std, CI over folds
  python -m fetalbrain.card RUN --write --rehash                    # record changed checkpoints (you vouch)

read more: docs/training.md ("Model cards")""",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.json)")
    parser.add_argument(
        "--write", action="store_true", help="rewrite model_card.json/.md, keeping the recorded checkpoint hashes"
    )
    parser.add_argument(
        "--rehash",
        action="store_true",
        help="with --write: record the checkpoints' current hashes; you accept that the card's metrics may not "
        "describe the new weights",
    )
    parser.add_argument(
        "--folds", type=Path, nargs="+", default=None, help="other runs of the same sweep: mean, std, 95%% interval"
    )
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    card_path = run_dir / CARD_JSON
    for folder in [run_dir, *(args.folds or [])]:
        if not (folder / SUMMARY_FILE).is_file():
            print(f"error: {folder} is not a run directory (no {SUMMARY_FILE})", file=sys.stderr)
            return 2
    if card_path.is_file() and not args.write and (args.folds or args.rehash):
        print("error: --folds and --rehash rewrite the card: add --write", file=sys.stderr)
        return 2
    try:
        if args.write or not card_path.is_file():
            card = write_model_card(run_dir, args.folds, rehash=args.rehash)
            print(f"wrote {card_path} and {run_dir / CARD_MD}", file=sys.stderr)
        else:
            card = read_card(card_path)
    except CheckpointIntegrityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(render_markdown(card))
    results = check_checkpoints(run_dir, card)
    width = max((len(name) for name, _, _ in results), default=0)
    for name, status, detail in results:
        print(f"{status:<8} {name:<{width}}  {detail}")
    problems = front_matter_problems(run_dir)
    for problem in problems:
        print(f"error: front matter: {problem}", file=sys.stderr)
    bad = [name for name, status, _ in results if status != "OK"]
    if bad:
        print(
            f"error: {len(bad)} checkpoint(s) changed, missing or not listed since the card was written "
            f"({', '.join(bad)}): its metrics do not describe them, and predict, export and generate refuse them. "
            "Restore the original files or retrain; --write --rehash records the current files, accepting that "
            "the card's metrics may not describe them.",
            file=sys.stderr,
        )
    if bad or problems:
        return 1
    if not card.get("checkpoints"):
        print("note: the card lists no checkpoint", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
