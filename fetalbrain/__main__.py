"""``python -m fetalbrain``: the commands, each with its first docstring line and where its help is."""

import ast
import sys
from pathlib import Path

COMMANDS = (  # in the order of a researcher's day
    "train", "evaluate", "predict", "app", "export", "compare", "card",
    "generate", "synth_quality", "audit", "benchmark",
)  # fmt: skip


def summary(command: str) -> str:
    """The first line of a command's module docstring, read without importing it (torch takes seconds)."""
    source = (Path(__file__).parent / f"{command}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.split("\n\n")[0].replace("\n", " ").split(": ")[0].rstrip(".")


def main() -> int:
    width = max(len(command) for command in COMMANDS)
    lines = ["fetalbrain: fetal brain ultrasound anomaly classification (research software, not a medical device).", ""]
    lines += ["Commands (python -m fetalbrain.COMMAND --help for each one's examples and choices):", ""]
    lines += [f"  {command:<{width}}  {summary(command)}" for command in COMMANDS]
    lines += ["", "Start: make install; make train; make gui. Read more: README.md and docs/."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
