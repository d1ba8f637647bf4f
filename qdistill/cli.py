"""Command-line plumbing shared by the scripts: the one-line error, argument types, logging, the device."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


PAPER_TEACHER = "sentence-transformers/msmarco-bert-base-dot-v5"


# BEIR datasets, training queries and assembled models live outside the repo; `make` passes DATA_DIR
DATA_DIR = os.environ.get("DATA_DIR", "downloads")


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2 by `cli`."""


# a uri's `user:password@` and any token=/password=/api_key= value: never written into a result, config, log or error
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s\"']+@|((?:token|password|api_key)=)[^&#\s\"']+", re.IGNORECASE)


def redact(text: str) -> str:
    """The text with credentials replaced by ***."""
    return _CREDENTIALS.sub(lambda m: (m.group(1) or "") + "***" + ("@" if m.group(0).endswith("@") else ""), text)


class RedactingFilter(logging.Filter):
    """Log records with credentials redacted (a uri with a password can reach a message through any library)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CREDENTIALS.search(message):
            record.msg, record.args = redact(message), None
        return True


def cli(main, argv=None) -> None:
    """Run a script's main(); turn UsageError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
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
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
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


def settings_from(cls, args):
    """A settings dataclass filled from parsed flags: the one hand-over from argparse to the helpers."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
