"""The documentation's commands and links stay honest: every `python <script>.py ...` line in README.md and docs/*.md
is parsed by that script's own parser (nothing runs), and every relative link resolves. Fast tier."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"...", "[more]"}  # prose shorthands inside commands, not flags


LAUNCHERS = {"python", "python3", "torchrun", ".venv/bin/python", "$(PY)"}


def commands(text: str):
    """(script module, argv) of each command that runs a script (python, torchrun) in the page's fenced code
    blocks: continuations joined, shell variables set earlier in the block expanded."""
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):  # NAME=value, alone or before a command
                name, value = tokens.pop(0).split("=", 1)
                env[name] = value
            if not tokens or tokens[0] not in LAUNCHERS:
                continue
            for i, token in enumerate(tokens):
                if token.endswith(".py") and "/" not in token and (ROOT / token).is_file():
                    yield token[:-3], [t for t in tokens[i + 1 :] if t not in PLACEHOLDERS]
                    break
                if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("benchmarks."):
                    yield tokens[i + 1], [t for t in tokens[i + 2 :] if t not in PLACEHOLDERS]
                    break


def all_commands():
    return [
        pytest.param(module, argv, id=f"{page.name}:{module}:{n}")
        for page in PAGES
        for n, (module, argv) in enumerate(commands(page.read_text()))
    ]


def test_the_pages_hold_commands_of_every_script():
    modules = {p.values[0] for p in all_commands()}
    scripts = {"distillation", "evaluate_retrieval", "evaluate_speed", "serving", "report", "benchmarks.large_index"}
    assert scripts <= modules, scripts - modules


@pytest.mark.parametrize("module, argv", all_commands())
def test_every_documented_command_parses(module, argv, capsys):
    script = importlib.import_module(module)
    try:
        script.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{module} {' '.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]} (exit {e.code})")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"
