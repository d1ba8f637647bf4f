"""Files a run leaves: atomic writes (never half-written), the training-text record, run metadata."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qdistill import cli

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_beside(path: Path, folder: bool) -> Path:
    """A temp file/folder `.NAME.<pid>.<rand>.tmp` beside path; stale ones of dead processes are removed first.

    mkstemp/mkdtemp create 0600/0700 whatever the umask, so the mode is set as a plain open/mkdir would.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):  # a killed run's leftovers; a live writer's are kept
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    kw = {"dir": path.parent, "prefix": f".{path.name}.{os.getpid()}.", "suffix": ".tmp"}
    if folder:
        tmp = Path(tempfile.mkdtemp(**kw))
    else:
        fd, name = tempfile.mkstemp(**kw)
        os.close(fd)
        tmp = Path(name)
    tmp.chmod((0o777 if folder else 0o666) & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_file(path: str | Path, folder: bool = False):
    """Yield a temp file (or folder) beside `path`; on success it replaces `path`, on failure it is removed.

    A reader never sees half a file, and a crash leaves only a temp that the next write cleans up.
    """
    path = Path(path)
    tmp = _temp_beside(path, folder)
    try:
        yield tmp
        if folder and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_dir(path: str | Path):
    return atomic_file(path, folder=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


# what a student trained on, saved in its final/ by distillation.py: evaluate_retrieval.py marks those collections
# in-domain, serving.py copies it into exports, and a later run started from that final/ inherits it
TRAINING_TEXT = "training_text.json"


def text_sources(model_path: str | Path) -> dict | None:
    """The training-text record of a model folder, or None (a teacher, a model from elsewhere)."""
    path = Path(model_path) / TRAINING_TEXT
    return json.loads(path.read_text()) if path.is_file() else None


def slug(name: str) -> str:
    """A file-system-safe name for a model id or path (output/run/final -> output__run__final)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", str(name).strip("/")).strip("_") or "model"


def run_info(args: dict, device: str | None = None, argv=None, script: str | None = None) -> dict:
    """Everything needed to say how a result was made: args, versions, commit and whether the tree had
    uncommitted changes, hardware (the GPU named is the one `device` runs on), and the command: the arguments
    given to main (argv), or the process's own when main was called without them."""
    import torch

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "sentence_transformers", "beir", "faiss", "numpy", "datasets", "onnxruntime"):
        with contextlib.suppress(Exception):
            versions[pkg] = __import__(pkg).__version__
    commit, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "args": dict(args),
        "versions": versions,
        "git_commit": commit or None,
        "git_dirty": None if not commit else bool(dirty),
        "hardware": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(torch.device(device if (device or "").startswith("cuda") else "cuda"))
            if torch.cuda.is_available()
            else None,
            "platform": platform.platform(),
        },
        "command": " ".join(sys.argv if argv is None else [Path(script or sys.argv[0]).name, *map(str, argv)]),
    }
    return json.loads(cli.redact(json.dumps(info, default=str)))  # a Milvus uri's password never reaches a file


def _git(*args) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
