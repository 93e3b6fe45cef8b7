"""Every command's --help teaches: what it does, examples, the choices a user has (no internal or example files),
and where to read more; ``python -m fetalbrain`` lists the commands."""

import re
import subprocess
import sys

import pytest

from fetalbrain.project import CONF_DIR, group_options

HELPED = ("train", "evaluate", "predict", "generate", "app", "export", "synth_quality", "benchmark")


def command_help(command: str, capsys, monkeypatch) -> str:
    """``python -m fetalbrain.COMMAND --help`` in this process (the command modules are imported already)."""
    module = __import__(f"fetalbrain.{command}", fromlist=["main"])
    monkeypatch.setattr(sys, "argv", [f"fetalbrain.{command}", f"--config-path={CONF_DIR}", "--help"])
    try:
        module.main()
    except SystemExit:
        pass
    return capsys.readouterr().out


@pytest.mark.parametrize("command", HELPED)
def test_help_says_what_it_does_with_examples_and_where_to_read_more(command, capsys, monkeypatch):
    text = command_help(command, capsys, monkeypatch)
    assert text.startswith(f"python -m fetalbrain.{command}"), text[:200]
    examples = re.findall(r"^[ ]+((?:python -m fetalbrain\.\w+|make \w+).*)$", text.split("Examples:")[1], re.M)
    assert 2 <= len(examples) <= 6 and any(f"fetalbrain.{command} " in line for line in examples), examples
    assert re.search(r"Read more: docs/\w+\.md", text)
    for page in re.findall(r"docs/(\w+)\.md", text):
        assert (CONF_DIR.parent / "docs" / f"{page}.md").is_file(), page
    assert "Powered by Hydra" not in text  # not Hydra's default page


def test_train_help_lists_the_real_choices_and_no_internal_files(capsys, monkeypatch):
    text = command_help("train", capsys, monkeypatch)
    choices = text.split("== Choices")[1].split("Examples:")[0]
    assert "_classifier" not in choices and ".example" not in choices
    assert "benchmark" not in choices.split("\n", 1)[1]  # another command's group
    assert "== Config ==" not in text and "optimized_metric" not in text  # not 220 lines of composed config
    listed = dict(line.split(None, 1) for line in choices.strip().splitlines()[1:])
    assert listed["model"].startswith("efficientnet_lite0 (default)")
    assert listed["data/split"].startswith("grouped (default)")
    for group, options in listed.items():
        named = [o.replace(" (default)", "") for o in options.split(", ")]
        assert set(named) - {"basic"} == set(group_options(group)), group  # every choice on disk, and only those
    for example in re.findall(r"^\s+python -m fetalbrain\.train (.*?)\s*(?:#|$)", text, re.M):
        for override in example.split():
            group, _, option = override.partition("=")
            if group in listed:
                assert all(o in listed[group] for o in option.split(",")), override  # examples name real choices


def test_python_m_fetalbrain_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fetalbrain"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "predict", "app", "export", "generate", "audit", "compare", "study", "card"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), command
    assert "Train one model" in result.stdout


@pytest.mark.parametrize("command", ["audit", "compare", "card", "study"])
def test_argparse_commands_help_with_examples_too(command, capsys):
    module = __import__(f"fetalbrain.{command}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith(f"usage: python -m fetalbrain.{command}")
    examples = re.findall(rf"^  python -m fetalbrain\.{command}\b.*$", text.split("examples:")[1], re.M)
    assert 2 <= len(examples) <= 6
    for page in re.findall(r"read more: docs/(\w+)\.md", text):
        assert (CONF_DIR.parent / "docs" / f"{page}.md").is_file(), page
