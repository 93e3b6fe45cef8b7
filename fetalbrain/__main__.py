"""``python -m fetalbrain``: the commands, each with its first docstring line and where its help is."""

import ast
import sys
from pathlib import Path

COMMANDS = (  # in the order of a researcher's day
    "train", "evaluate", "predict", "app", "export", "compare", "study", "card",
    "generate", "synth_quality", "audit", "benchmark",
)  # fmt: skip


def summary(command: str) -> str:
    """The first line of a command's module docstring, read without importing it (torch takes seconds)."""
    source = (Path(__file__).parent / f"{command}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.split("\n\n")[0].replace("\n", " ").split(": ")[0].rstrip(".")


def main(argv: list[str] | None = None) -> int:
    """``fetalbrain`` lists the commands; ``fetalbrain COMMAND ARGS`` runs one, as ``python -m fetalbrain.COMMAND``."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        import runpy

        sys.argv = [f"fetalbrain.{args[0]}", *args[1:]]
        runpy.run_module(f"fetalbrain.{args[0]}", run_name="__main__", alter_sys=True)
        return 0
    if args and args[0] not in ("-h", "--help"):
        print(f"fetalbrain: unknown command {args[0]!r}; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    width = max(len(command) for command in COMMANDS)
    lines = ["fetalbrain: fetal brain ultrasound anomaly classification (research software, not a medical device).", ""]
    lines += ["Commands (python -m fetalbrain.COMMAND --help for each one's examples and choices):", ""]
    lines += [f"  {command:<{width}}  {summary(command)}" for command in COMMANDS]
    lines += ["", "Start: make install; make train; make gui. Read more: README.md and docs/."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
