"""The layout: five commands at the root over one package; nothing runs at import; the original flags stay."""

import importlib
import subprocess
import sys

import pytest
from conftest import ROOT

COMMANDS = ["distillation", "evaluate_retrieval", "evaluate_speed", "serving", "report"]
# the original project's flags (its README and scripts), which every command that had them still takes
ORIGINAL_FLAGS = {
    "distillation": [
        "--teacher_model",
        "--student_model_init",
        "--student_model_init_list",
        "--output_path",
        "--train_batch_size",
        "--eval_batch_size",
    ],
    "evaluate_retrieval": ["--teacher_model", "--output_path"],
}


def test_the_root_holds_the_five_commands_and_no_other_python_file():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(COMMANDS)


def test_every_package_module_imports_without_side_effects(tmp_path):
    """Each module imported alone in a fresh interpreter, from an empty folder: no file written, nothing printed,
    no logging configured, no torch thread count changed."""
    modules = sorted(p.stem for p in (ROOT / "qdistill").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 20
    code = (
        "import importlib, logging, sys, torch; sys.path.insert(0, sys.argv[1]); threads = torch.get_num_threads()\n"
        "for m in sys.argv[2:]:\n"
        "    importlib.import_module('qdistill.' + m)\n"
        "assert not logging.getLogger().handlers and logging.getLogger('qdistill').level == logging.NOTSET\n"
        "assert torch.get_num_threads() == threads\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), *modules], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and not list(tmp_path.iterdir()), (proc.stdout, list(tmp_path.iterdir()))


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_imports_without_running_and_its_help_lists_the_original_flags(command, capsys):
    module = importlib.import_module(command)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"]) if command != "report" else module.parse_args(["example", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ORIGINAL_FLAGS.get(command, []):
        assert flag in out, (command, flag)
