"""Every command the README, the docs and the config files show is one `teco-ssm` accepts: it parses, names an
existing config with fields that exist, and no removed entry point is taught. (The stages themselves run for real
in tests/test_end_to_end.py, with the same options.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from teco_ssm import cli, config_io, stages

ROOT = Path(__file__).parents[1]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.py"),
                    ROOT / "teco_ssm" / "cli.py", ROOT / "vqgan" / "convert.py"])
_COMMAND = re.compile(r"(?:^|[`\s&;(])(?:\.venv/bin/)?(teco-ssm\s(?:[^`\n\\]|\\\n|\\)*)")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `teco-ssm ...` line, continuation lines joined, comments and a trailing `&` (a
    process started in the background) dropped."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in _COMMAND.finditer(text):
            command = match.group(1).replace("\\\n", " ").split(" #")[0].split(" &")[0].strip()
            line = text[:match.start(1)].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", command))
    return found


COMMANDS = documented_commands()


def _is_synopsis(command: str) -> bool:
    """Prose that names several subcommands at once (`teco-ssm data | tokenizer | ... --help`, `teco-ssm <stage>`)."""
    return "|" in command or "<" in command


def test_the_documents_show_commands_of_every_subcommand():
    used = {shlex.split(c)[1] for _, c in COMMANDS if not _is_synopsis(c)}
    subcommands = set(cli.parser()._subparsers._group_actions[0].choices)
    assert subcommands - {"convert-taming"} <= used, sorted(subcommands - used)
    assert "convert-taming" in used


@pytest.mark.parametrize("where, command", [c for c in COMMANDS if not _is_synopsis(c[1])],
                         ids=[w for w, c in COMMANDS if not _is_synopsis(c)])
def test_documented_command_parses_and_its_config_exists(where, command):
    argv = shlex.split(command)[1:]
    subcommands = cli.parser()._subparsers._group_actions[0].choices
    if len(argv) == 1 and argv[0] != "run":  # prose naming a subcommand (`teco-ssm eval` calls ...)
        assert argv[0] in subcommands, f"{where}: no subcommand {argv[0]!r}"
        return
    try:
        args = vars(cli.parser().parse_args(argv))
    except SystemExit:
        pytest.fail(f"{where}: `{command}` is not a valid teco-ssm command")
    if args["command"] == "sample":
        stages.parse_protocol(args["protocol"])
    if args["command"] == "train" and args["config"] is None:  # the workdir's config.json, else the default
        args["config"] = stages.DEFAULT_TRAIN_CONFIG
        if any(m[1] == "convert-teco" and args["workdir"] in m
               for m in (shlex.split(c) for _, c in COMMANDS if not _is_synopsis(c))):
            args["config"] = f"{args['workdir']}/config.json"
    if args["command"] == "train" and args["config"].endswith(".json"):  # a workdir's config.json
        workdir = args["config"].removesuffix("/config.json")
        makers = [shlex.split(c) for _, c in COMMANDS if not _is_synopsis(c)]
        assert any(m[1] in ("convert-teco", "train") and workdir in m for m in makers), \
            f"{where}: no documented command writes {args['config']}"
        return
    if args["command"] in ("train", "tokenizer"):
        paths = ([f"data.path={args['data']}"] if args["command"] == "tokenizer" else
                 [f"dataset.path={args['data']}"] if args.get("data") else [])
        config_io.load_config(args["config"], [*paths, *args["overrides"]])  # unknown fields raise, naming them


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_no_document_teaches_a_removed_entry_point(path):
    text = path.read_text()
    removed = re.findall(r"(?<!TECO's `)scripts/(?!bench_|diagnose_)\w+\.py|--config\.\w", text)
    assert not removed, f"{path.relative_to(ROOT)} still shows {sorted(set(removed))}"


def test_scripts_hold_only_measurements():
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == [
        "bench_backbones.py", "bench_data.py", "bench_sampling.py", "bench_train.py", "diagnose_rollouts.py"]


def test_the_finder_sees_continuation_lines_and_inline_commands(tmp_path):
    """The extraction itself: a broken command in either form is found, so the parse test would fail on it."""
    text = "Run `teco-ssm eval s --bogus 1` or\n```\nteco-ssm train --workdir w \\\n    --nope x\n```\n"
    commands = [m.group(1).replace("\\\n", " ") for m in _COMMAND.finditer(text)]
    assert [c.split()[1:3] for c in commands] == [["eval", "s"], ["train", "--workdir"]]
    assert "--nope x" in commands[1]
    for command in commands:
        with pytest.raises(SystemExit):
            cli.parser().parse_args(shlex.split(command)[1:])
