"""Plain helpers the three scripts share: errors, run metadata, atomic writes, the device, model loading."""

from __future__ import annotations

import argparse
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

logger = logging.getLogger("qdistill")

PAPER_TEACHER = "sentence-transformers/msmarco-bert-base-dot-v5"
# BEIR datasets, training queries and assembled models live outside the repo; `make` passes DATA_DIR
DATA_DIR = os.environ.get("DATA_DIR", "downloads")


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2 by `cli`."""


def cli(main, argv=None) -> None:
    """Run a script's main(); turn UsageError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        _leave_process_group()
        sys.exit(2)


def _leave_process_group() -> None:
    """Close a torchrun process group before exiting: left open, gloo's threads abort the process (exit -6)."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def setup_logging(level: str = "info") -> None:
    # libraries (beir logs every metric through the root logger) keep warnings only; ours use `level`
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, force=True
    )
    logging.getLogger("qdistill").setLevel(getattr(logging, level.upper()))


def start_run(log_level: str, seed: int, output_path: str | Path) -> None:
    """Each script's opening: logging, seeds and a writable output folder."""
    from transformers import set_seed

    setup_logging(log_level)
    set_seed(seed)
    check_writable(output_path)


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negatives are rejected with exit code 2, never read as 'all')."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds: numpy refuses negatives)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay, loss weights)."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def share(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device) under torchrun or accelerate launch; (0, 1, device) otherwise.

    The process group is set up here (gloo on CPU, nccl on GPUs) so ranks can wait for each other before the
    trainer starts; the trainer's DDP then uses it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _share_outcome(message: str | None) -> str | None:
    """Rank 0's outcome (None, or its error line) sent to every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first(rank: int):
    """Rank 0 runs the block first (checking inputs, filling caches); the other ranks run it after, reading what
    it wrote. A bad input found by rank 0 reaches every rank, so all exit 2 with the same one line instead of
    waiting in a barrier for a rank that is gone."""
    if rank_world()[1] == 1:
        yield
        return
    if rank != 0:
        error = _share_outcome(None)
        if error is not None:
            raise UsageError(error)
        yield
        return
    try:
        yield
    except UsageError as e:
        _share_outcome(str(e))
        raise
    _share_outcome(None)


# ----------------------------------------------------------------------------- files


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


def check_writable(path: str | Path) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"output folder {path} is not writable ({e.strerror}); pass a writable --output_path") from e


def check_file(path: str | Path, what: str, fix: str) -> Path:
    """An existing file, or one line saying what is there instead."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, expected a file; {fix}")
    if not path.is_file():
        raise UsageError(f"{what} {path} not found; {fix}")
    return path


def slug(name: str) -> str:
    """A file-system-safe name for a model id or path (output/run/final -> output__run__final)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", str(name).strip("/")).strip("_") or "model"


# ----------------------------------------------------------------------------- run metadata


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
    return {
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


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device} asked for, but this machine has no MPS (Apple GPU); use cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda and mps devices are supported")
    return device
