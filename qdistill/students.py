"""Students: the teacher's own layers (layer reduction), another pretrained model, or a static embedding table.

Every student answers for the teacher's query side: same prompts, same similarity, same output dimension.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdistill import encoders, run_files
from qdistill.cli import UsageError

logger = logging.getLogger(__name__)

# where each architecture keeps its transformer blocks (attribute path on the HF model) and its depth field:
# BERT, MPNet, RoBERTa (encoder.layer); DistilBERT (transformer.layer); ModernBERT and the decoder embedders
# (Qwen2/Qwen3, Llama/Mistral, Gemma3 as transformers defines them: layers)
LAYER_LAYOUTS = [
    ("encoder.layer", "num_hidden_layers"),
    ("transformer.layer", "n_layers"),
    ("layers", "num_hidden_layers"),
]
KNOWN = "BERT, MPNet, RoBERTa, DistilBERT, ModernBERT, Qwen2/Qwen3, Llama/Mistral and Gemma3"
STRATEGIES = ("top_bottom", "bottom", "top", "uniform")


def choose_layers(total: int, num_layers: int, strategy: str = "top_bottom") -> list[int]:
    """Layer ids for a preset: top_bottom keeps the bottom half-and-top half (paper: 2 -> [0, L-1])."""
    if not 1 <= num_layers <= total:
        raise UsageError(f"--num_layers {num_layers} out of range: the teacher has {total} layers (1..{total})")
    if strategy == "bottom":
        return list(range(num_layers))
    if strategy == "top":
        return list(range(total - num_layers, total))
    if strategy == "uniform":
        return sorted({round(i * (total - 1) / max(num_layers - 1, 1)) for i in range(num_layers)})
    bottom = num_layers // 2
    return list(range(bottom)) + list(range(total - (num_layers - bottom), total))


def find_layers(hf_model):
    """(parent, attribute, depth field, blocks) of a model's transformer layers, for the layouts of KNOWN."""
    for path, field in LAYER_LAYOUTS:
        obj = hf_model
        *parents, last = path.split(".")
        try:
            for name in parents:
                obj = getattr(obj, name)
            layers = getattr(obj, last)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return obj, last, field, layers
    raise UsageError(
        f"unsupported architecture {hf_model.__class__.__name__}: layer reduction knows the {KNOWN} layouts; "
        "use --student_model_init pretrained (a small model, projected to the teacher's dimension) or static instead"
    )


def config_depth(model_path) -> int | None:
    """The number of transformer layers a model folder's config.json declares, without loading it."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(model_path) / "config.json").read_text())
        return next((config[f] for _, f in LAYER_LAYOUTS if isinstance(config.get(f), int)), None)
    return None


def num_teacher_layers(teacher) -> int:
    return len(find_layers(teacher[0].auto_model)[3])


def depth(model) -> int:
    """Transformer layers of a SentenceTransformer; 0 for a static table."""
    auto = getattr(model[0], "auto_model", None)
    return len(find_layers(auto)[3]) if auto is not None else 0


def layer_reduced_student(teacher, keep: list[int]):
    """A deep copy of the teacher with only the `keep` transformer layers; config updated so it reloads."""
    total = num_teacher_layers(teacher)
    if len(set(keep)) != len(keep):
        raise UsageError(f"--layers {keep} has duplicates; give each layer id once")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise UsageError(f"--layers {bad} out of range: the teacher has {total} layers (ids 0..{total - 1})")
    if type(teacher[0].auto_model).__name__.startswith("ModernBert") and 0 not in keep:
        # its first layer has no attention norm (the embeddings are normed): as layer 0 of a student, another
        # layer would lose its norm when the student is reloaded
        raise UsageError(f"--layers {keep}: a ModernBERT student keeps layer 0 (its only layer without a norm)")
    student = copy.deepcopy(teacher)
    hf = student[0].auto_model
    parent, attr, field, layers = find_layers(hf)
    kept = [layers[i] for i in sorted(keep)]
    setattr(parent, attr, torch.nn.ModuleList(kept))
    setattr(hf.config, field, len(keep))
    # per-layer settings follow their layers: the attention kind (global/local, full/sliding) by position in
    # layer_types, and each block's layer_idx (caches are indexed by it) renumbered to its new place
    if isinstance(getattr(hf.config, "layer_types", None), list):
        hf.config.layer_types = [hf.config.layer_types[i] for i in sorted(keep)]
        if hasattr(hf, "has_sliding_layers"):
            hf.has_sliding_layers = "sliding_attention" in hf.config.layer_types
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    return student


def set_dropout(model, p: float) -> None:
    """Set every dropout in a student (modules and HF config, so a reload keeps it) to p."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                if isinstance(getattr(config, field, None), float):
                    setattr(config, field, p)


def freeze_token_embeddings(student) -> None:
    """Keep a transformer student's embedding layer fixed (a pretrained student too, e.g. an earlier run's final/)."""
    auto = getattr(student[0], "auto_model", None)
    embeddings = getattr(auto, "embeddings", None) or (auto.get_input_embeddings() if auto is not None else None)
    if embeddings is None:
        raise UsageError(
            f"--freeze_embeddings needs a transformer student; {type(student[0]).__name__} has no embedding layer "
            "to freeze apart from the rest: drop the flag"
        )
    embeddings.requires_grad_(False)


def pretrained_student(name: str, teacher, device: str, data_dir: str, dim: int | None = None, layers=None):
    """A small pretrained model as student (only its `layers`, if given), with a trainable Dense projection to the
    teacher's dimension (or `dim`, a Matryoshka truncation of it)."""
    student, _ = encoders.load_model(name, device=device, data_dir=data_dir)
    if layers:
        total = num_teacher_layers(student)
        if max(layers) >= total:
            raise UsageError(f"--layers {' '.join(map(str, layers))}: {name} has layers 0..{total - 1}")
        student = layer_reduced_student(student, sorted(layers))
    return project(student, teacher, dim or teacher.get_embedding_dimension(), device, name)


def project(student, teacher, t_dim: int, device: str, name: str):
    """The student with a Dense projection to t_dim where its own width differs, normalised like the teacher."""
    from sentence_transformers import models

    s_dim = student.get_embedding_dimension()
    if s_dim != t_dim:
        logger.info("student %s is %d-d, teacher %d-d: adding a Dense projection", name, s_dim, t_dim)
        student.append(models.Dense(s_dim, t_dim, bias=True, activation_function=torch.nn.Identity()).to(device))
        if encoders.normalizes(teacher):
            student.append(models.Normalize())
    student.similarity_fn_name = teacher.similarity_fn_name
    return student


def fold_static_projection(student):
    """A static table followed by a Dense projection, as one table in the teacher's space: the mean of projected
    rows is the projected mean (bias included), so the student answers the same and exports as a plain table."""
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    mods = list(student)
    if not (len(mods) > 1 and isinstance(mods[0], StaticEmbedding) and isinstance(mods[1], models.Dense)):
        return student
    with torch.no_grad():
        table = mods[1].linear(mods[0].embedding.weight.float())
    folded = StaticEmbedding(mods[0].tokenizer, embedding_weights=table.cpu())
    out = SentenceTransformer(modules=[folded, *mods[2:]], device=str(student.device))
    out.similarity_fn_name, out.prompts = student.similarity_fn_name, dict(student.prompts)
    out.default_prompt_name = student.default_prompt_name
    return out


def fit_projection(student, texts: list[str], labels: np.ndarray, prompt: str = "", batch_size: int = 256):
    """Start a student's Dense projection at the least-squares map from its features to the labels (the frozen
    student + linear map baseline), so training begins where that baseline ends. Returns the fit's mean cosine,
    or None when the student has no projection."""
    from sentence_transformers import models
    from sentence_transformers.util import batch_to_device

    mods = list(student)
    dense = [i for i, m in enumerate(mods) if isinstance(m, models.Dense)]
    if not dense or not texts:
        return None
    head, feats = mods[: dense[-1]], []
    with torch.inference_mode():  # in the texts' order (encode() sorts them by length)
        for start in range(0, len(texts), batch_size):
            features = student.preprocess([prompt + t for t in texts[start : start + batch_size]])
            features = batch_to_device(features, student.device)
            for module in head:
                features = module(features)
            feats.append(features["sentence_embedding"].float().cpu())
    x = torch.cat(feats).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    w = torch.linalg.lstsq(x, y).solution  # (in + 1, out)
    with torch.no_grad():
        mods[dense[-1]].linear.weight.copy_(w[:-1].T.float())
        mods[dense[-1]].linear.bias.copy_(w[-1].float())
    return float(torch.nn.functional.cosine_similarity(x @ w, y).mean())


def static_student(teacher, device: str, batch_size: int = 512):
    """A StaticEmbedding student whose row for each token is the teacher's own embedding of that token alone.

    No PCA: the table stays in the teacher's embedding space, so it can be aligned with the same losses.
    """
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tqdm.auto import tqdm

    tok = teacher.tokenizer
    if not getattr(tok, "is_fast", False):
        raise UsageError("--student_model_init static needs a teacher with a fast (tokenizers) tokenizer")
    vocab = len(tok)
    specials = [i for i in (tok.cls_token_id, tok.sep_token_id) if i is not None]
    rows = []
    with torch.inference_mode():
        for start in tqdm(range(0, vocab, batch_size), desc="static student: per-token outputs of its table's model"):
            ids = torch.arange(start, min(start + batch_size, vocab))
            # [CLS] token [SEP], as the teacher sees a one-token query
            input_ids = torch.stack([torch.tensor([*specials[:1], int(i), *specials[1:]]) for i in ids]).to(device)
            feats = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if "token_type_ids" in tok.model_input_names:
                feats["token_type_ids"] = torch.zeros_like(input_ids)
            rows.append(teacher(feats)["sentence_embedding"].float().cpu())
    table = torch.cat(rows)
    # every one-token input shares [CLS]/[SEP], a common component that swamps the token: centring removes it
    # (on MS MARCO queries, cosine to the teacher before training 0.39 -> 0.55), a translation within its space
    table = table - table.mean(0, keepdim=True)
    # its own copy of the tokenizer: the teacher's HF tokenizer turns padding back on whenever it encodes, and
    # padded ids would leak into StaticEmbedding's bag-of-tokens mean
    from tokenizers import Tokenizer

    static = StaticEmbedding(Tokenizer.from_str(tok.backend_tokenizer.to_str()), embedding_weights=table)
    modules = [static]
    if encoders.normalizes(teacher):
        modules.append(models.Normalize())
    student = SentenceTransformer(modules=modules, device=device, similarity_fn_name=teacher.similarity_fn_name)
    return student


def save_asymmetric(student, teacher, path, final=None):
    """One folder, one SentenceTransformer: encode_query runs the student, encode_document the teacher.

    The student's training-text record (in `final`) is copied in, so evaluations mark it as they mark final/.
    """
    import shutil

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Router

    router = Router.for_query_document(query_modules=list(student), document_modules=list(teacher))
    model = SentenceTransformer(
        modules=[router],
        device=str(teacher.device),
        prompts=dict(teacher.prompts),
        similarity_fn_name=teacher.similarity_fn_name,
    )
    with run_files.atomic_dir(path) as tmp:
        model.save(str(tmp))
        if final is not None and (Path(final) / run_files.TRAINING_TEXT).is_file():
            shutil.copy(Path(final) / run_files.TRAINING_TEXT, tmp / run_files.TRAINING_TEXT)


def build_student(
    init: str,
    teacher,
    device: str,
    layers=None,
    num_layers=2,
    strategy="top_bottom",
    freeze_embeddings=False,
    dropout=None,
    max_seq_length=128,
    data_dir=".",
    batch_size=256,
    static_on=None,
    dim=None,
):
    """(student, info): init is layer_reduction, static (the teacher's per-token table, or `static_on`'s projected
    to the teacher's dimension), or a pretrained model's HF id/path (only its `layers`, if given).

    Layer ids are checked against the teacher here, so a caller can fail fast before any labelling.
    """
    if init == "layer_reduction":
        total = num_teacher_layers(teacher)
        keep = sorted(layers) if layers else choose_layers(total, num_layers, strategy)
        student = layer_reduced_student(teacher, keep)
        info = {"student_init": init, "layers": keep, "teacher_layers": total}
    elif init == "static" and static_on:  # another model's tokenizer and table, projected to the teacher's space
        table_of, _ = encoders.load_model(static_on, device=device, data_dir=data_dir)
        # the table's raw mean, then the projection: linear, so fold_static_projection can merge it into the table
        from sentence_transformers import SentenceTransformer

        student = SentenceTransformer(modules=[static_student(table_of, device, batch_size)[0]], device=device)
        student = project(student, teacher, dim or teacher.get_embedding_dimension(), device, static_on)
        info = {"student_init": "static", "static_on": static_on}
    elif init == "static":
        student, info = static_student(teacher, device, batch_size), {"student_init": "static"}
    else:
        student = pretrained_student(init, teacher, device, data_dir, dim, layers)
        info = {"student_init": init, **({"layers": sorted(layers)} if layers else {})}
    if freeze_embeddings == "if_any":  # the recipe's default: a table student (static) has nothing apart to freeze
        freeze_embeddings = getattr(student[0], "auto_model", None) is not None
    if freeze_embeddings:
        freeze_token_embeddings(student)
    info["freeze_embeddings"] = bool(freeze_embeddings)  # what was done (a table student has nothing to freeze)
    if dropout is not None:
        set_dropout(student, dropout)
    encoders.carry_prompts(student, teacher)
    if hasattr(student[0], "auto_model"):  # a transformer; a static table (ours or model2vec's) has no length limit
        student.max_seq_length = max_seq_length  # the student is a query encoder
    return student, info
