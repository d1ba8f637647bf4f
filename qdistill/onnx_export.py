"""Exporting a student for ONNX Runtime (fp32, int8, or a static table), checked against the torch model (cosine on
real queries) and cached per model content and export recipe."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from qdistill import encoders, run_files, students, teacher_outputs
from qdistill.cli import UsageError
from qdistill.lean import EXPORT_FILE, LeanEncoder, backend_name  # noqa: F401 - backend_name: used by callers
from qdistill.search import cosine_rows

logger = logging.getLogger(__name__)

INT8_OPS = ["MatMul", "Attention"]  # Attention: the fused QKV projection (0.90 -> 0.77 ms per MiniLM query)


def export_tag() -> str:
    """What besides the model changes an export: the recipe and the exporting libraries (cached exports key on it)."""
    import hashlib

    import onnxruntime

    recipe = ["eager attention", "ort optimizer (bert)", *INT8_OPS, onnxruntime.__version__, torch.__version__]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:8]


VARIANTS = ("fp32", "int8", "static")


# the export's mean cosine to the torch model on real queries: fp32 must be the same model, int8 close to it
MIN_COSINE = {"fp32": 0.999, "int8": 0.98, "static": 0.999}


def is_export(path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def check_export(folder) -> dict:
    """export.json of an exported folder, its graph (or table) and tokenizer checked to read back; one line
    naming what is damaged otherwise (a truncated copy, an interrupted write)."""
    folder = Path(folder)
    fix = f"export it again: python serving.py --model <the run's final/> --output_path {folder.parent}"
    try:
        meta = json.loads((folder / EXPORT_FILE).read_text())
        missing = [k for k in ("variant", "max_seq_length", "dim") if k not in meta]
        if missing or meta["variant"] not in VARIANTS:
            raise ValueError(f"missing fields {missing}" if missing else f"unknown variant {meta['variant']!r}")
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder / EXPORT_FILE} is malformed ({str(e)[:80]}); {fix}") from e
    try:
        if meta["variant"] == "static":
            np.load(folder / "table.npy", mmap_mode="r")
        else:
            import onnx

            onnx.checker.check_model(str(folder / "model.onnx"))
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - protobuf, numpy and tokenizers each raise their own kinds
        raise UsageError(f"{folder} holds a damaged export ({str(e).splitlines()[0][:100]}); {fix}") from e
    return meta


def export_folder(model_name: str, model_path, output_root) -> Path:
    """The one place exports live: <output_root>/onnx/<model>-<content fingerprint>-<export recipe tag>/, written
    by serving.py and read by evaluate_speed.py (and evaluate_retrieval.py takes its variant folders)."""
    from qdistill import teacher_outputs

    return (
        Path(output_root)
        / "onnx"
        / f"{run_files.slug(model_name)}-{teacher_outputs.model_fingerprint(model_path)}-{export_tag()}"
    )


def cached_export(model_name, model_path, output_root, texts, int8: bool, num_threads=None) -> dict:
    """{variant: LeanEncoder} of a model's export, made once per model content and recipe (export_folder).

    A damaged cache entry (an interrupted copy, a truncated graph) is exported again, never trusted."""
    folder = export_folder(model_name, model_path, output_root)

    def wanted():  # a static student exports one table; a transformer fp32 (and int8)
        return ["static"] if is_export(folder / "static") else ["fp32"] + (["int8"] if int8 else [])

    def intact(variant):
        try:
            return is_export(folder / variant) and bool(check_export(folder / variant))
        except UsageError as e:
            logger.warning("rebuilding a damaged cached export: %s", e)
            return False

    if not all([intact(v) for v in wanted()]):
        # an int8 export already there is made again beside the fp32 one, never deleted as a stale variant
        keep_int8 = int8 or is_export(folder / "int8")
        export(model_path, folder, texts[:200], int8=keep_int8, num_threads=num_threads)
    return {v: LeanEncoder(folder / v, num_threads=num_threads) for v in wanted()}


def _finish(tmp: Path, source: Path, meta: dict, reference, queries, num_threads=None, accept=False) -> dict:
    """Fidelity check against the torch model, export.json, and the student's training-text record.

    An fp32 (or static) export below MIN_COSINE is refused: it is not the same model. int8 below it is kept
    with a loud warning. accept=True keeps either (the value is recorded in export.json).
    """
    enc = LeanEncoder(tmp, meta, num_threads)
    meta["cosine_to_torch"] = float(cosine_rows(enc.encode(queries), reference).mean())
    low, floor = meta["cosine_to_torch"] < MIN_COSINE[meta["variant"]], MIN_COSINE[meta["variant"]]
    if low and not accept and meta["variant"] != "int8":
        raise UsageError(
            f"the {meta['variant']} export's cosine to the torch model is {meta['cosine_to_torch']:.4f} (< {floor}): "
            "it is not the same model; report it, or pass --accept_low_fidelity to keep it anyway"
        )
    if low:
        logger.warning(
            "LOW FIDELITY: the %s export's cosine to the torch model is %.4f (< %g); check its retention",
            meta["variant"],
            meta["cosine_to_torch"],
            floor,
        )
    if (source / run_files.TRAINING_TEXT).is_file():  # in-domain marking follows the model into its exports
        shutil.copy(source / run_files.TRAINING_TEXT, tmp / run_files.TRAINING_TEXT)
    run_files.write_json(tmp / EXPORT_FILE, meta)
    return meta


class _Pipeline(torch.nn.Module):
    """The whole SentenceTransformer forward (transformer, pooling, dense, normalize) from token ids: one graph."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(dict(zip(self.names, inputs)))["sentence_embedding"]


def export(model_path, out, queries: list[str], int8: bool = True, num_threads=None, accept=False) -> dict:
    """Export a saved student (any final/) for ONNX Runtime; returns {variant: export.json content}.

    Variant folders of an earlier export to the same `out` that this one does not write are removed, so the
    folder never holds two models.
    """
    written = _export(model_path, out, queries, int8, num_threads, accept)
    for stale in set(VARIANTS) - set(written):
        if (Path(out) / stale).is_dir():
            logger.info("removing %s: an earlier export's variant, not written by this one", Path(out) / stale)
            shutil.rmtree(Path(out) / stale)
    return written


# tracing and optimising a graph holds several copies of the weights: a 2.4 GB (600M-parameter) decoder was killed
# at 24 GiB resident here, so an export needing more than this many times its weights is refused up front
EXPORT_MEMORY_FACTOR = 10


def check_memory(model, model_path) -> None:
    """One line, before any tracing, when the export would not fit this machine's available memory."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        available = next(int(x.split()[1]) * 1024 for x in open("/proc/meminfo") if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    if weights * EXPORT_MEMORY_FACTOR > available:
        raise UsageError(
            f"exporting {model_path} ({weights / 2**30:.1f} GiB of weights) needs about "
            f"{weights * EXPORT_MEMORY_FACTOR / 2**30:.0f} GiB while tracing; {available / 2**30:.0f} GiB is "
            "available here: export it on a larger machine, or time it with --backend torch"
        )


def _export(model_path, out, queries, int8, num_threads, accept) -> dict:
    from sentence_transformers.models import Router, StaticEmbedding

    model, path = encoders.load_model(str(model_path), "cpu")
    if any(isinstance(m, Router) for m in model):
        raise UsageError(f"{model_path} is a Router (asymmetric) folder; export its student folder (final/) instead")
    tok = model.tokenizer
    if not getattr(tok, "is_fast", True) and not isinstance(model[0], StaticEmbedding):
        raise UsageError(f"{model_path} has no fast tokenizer; the lean query path needs one (tokenizer.json)")
    check_memory(model, model_path)
    reference = model.encode_query(queries, batch_size=64)
    settings = {
        "source": str(model_path),
        "source_fingerprint": teacher_outputs.model_fingerprint(path),
        "max_seq_length": encoders.length_limit(model),
        "prompt": encoders.input_prompt(model, "query"),
        "similarity": encoders.similarity_name(model),
        "dim": model.get_embedding_dimension(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
        "pad_id": getattr(tok, "pad_token_id", None) or 0,
        "layers": students.depth(model),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    out, written = Path(out), {}
    if isinstance(model[0], StaticEmbedding):
        with run_files.atomic_dir(out / "static") as tmp:
            np.save(tmp / "table.npy", model[0].embedding.weight.detach().float().numpy())
            model[0].tokenizer.save(str(tmp / "tokenizer.json"))
            meta = _finish(
                tmp,
                path,
                {**settings, "variant": "static", "normalize": encoders.normalizes(model)},
                reference,
                queries,
                num_threads,
                accept,
            )
        return {"static": meta}
    auto = getattr(model[0], "auto_model", None)
    # token type ids only where the model takes them: a tokenizer may give them to a model without any (a BERT
    # tokenizer on a decoder)
    takes = "token_type_ids" in inspect.signature(auto.forward).parameters if auto is not None else True
    names = ["input_ids", "attention_mask"]
    names += ["token_type_ids"] if "token_type_ids" in tok.model_input_names and takes else []
    sample = tok(["a query to trace", "another"], padding=True, return_tensors="pt")
    if hasattr(auto, "set_attn_implementation"):
        try:  # the eager attention graph is the one ONNX Runtime's optimizer fuses into its Attention kernel
            auto.set_attn_implementation("eager")
        except (ValueError, NotImplementedError):
            pass
    with run_files.atomic_dir(out / "fp32") as tmp:
        _trace(model, names, sample, tmp / "traced.onnx", model_path)
        fused = _fuse(tmp / "traced.onnx", tmp / "model.onnx", getattr(auto, "config", None))
        tok.save_pretrained(str(tmp))
        meta = {**settings, "variant": "fp32", "inputs": names, "fused_ops": fused}
        written["fp32"] = _finish(tmp, path, meta, reference, queries, num_threads, accept)
    if int8:
        with run_files.atomic_dir(out / "int8") as tmp:
            _quantize(out / "fp32" / "model.onnx", tmp / "model.onnx")
            tok.save_pretrained(str(tmp))
            how = f"dynamic, {'+'.join(INT8_OPS)}, per-channel"
            meta = {**settings, "variant": "int8", "inputs": names, "quantization": how}
            written["int8"] = _finish(tmp, path, meta, reference, queries, num_threads, accept)
    return written


def _trace(model, names, sample, target: Path, model_path) -> None:
    try:
        graph, inputs = _Pipeline(model.eval(), names), tuple(sample[n] for n in names)
        torch.onnx.export(
            graph,
            inputs,
            str(target),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamo=False,
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
            opset_version=17,
        )
    except Exception as e:  # noqa: BLE001 - unsupported ops of an architecture: one line, nothing left behind
        raise UsageError(f"cannot export {model_path} to ONNX ({str(e).splitlines()[0][:120]})") from e


def _quantize(source: Path, target: Path) -> None:
    """Weights only, per channel, signed: per-tensor int8 loses ~2% cosine on MiniLM. The fused graph's
    com.microsoft ops defeat ONNX shape inference, hence the default tensor type."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=INT8_OPS,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


def _fuse(traced: Path, target: Path, config) -> dict:
    """ONNX Runtime's transformer optimizer: Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm where it finds them.

    Returns {fused op: count}; an architecture it does not know is kept as traced ({}).
    """
    fused = {}
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    if heads and hidden:
        from onnxruntime.transformers import optimizer

        try:  # BERT's pattern matcher also serves MPNet/RoBERTa-like graphs; what it cannot match stays unfused
            opt = optimizer.optimize_model(str(traced), model_type="bert", num_heads=heads, hidden_size=hidden)
            fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            opt.save_model_to_file(str(target))
        except Exception as e:  # noqa: BLE001 - the traced graph is correct, only slower
            logger.warning("ONNX Runtime's optimizer failed (%s); keeping the unfused graph", str(e)[:120])
            fused = {}
            target.unlink(missing_ok=True)
    if not target.is_file():
        shutil.copy(traced, target)
    traced.unlink()
    return fused
