"""Training one student: the teacher's targets, SentenceTransformerTrainer, and the saved final/ with its record.

distillation.py decides what to train (inputs, recipe, runs); this module trains it.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from qdistill import encoders, losses, run_files, training_text
from qdistill.cli import UsageError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The trainer's settings, as resolved from the recipe and the flags."""

    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    learning_rate: float
    warmup_steps: int
    num_train_epochs: float
    adam_epsilon: float
    weight_decay: float
    eval_steps: int
    logging_steps: int
    save_total_limit: int
    seed: int
    fp16: bool
    bf16: bool
    group_by_length: bool


class Targets(NamedTuple):
    """What the student is trained and validated against, all from the frozen teacher."""

    texts: list[str]  # training texts (triples' queries, or texts plus perturbed variants)
    labels: np.ndarray  # the teacher's query embedding of each training text
    dev_texts: list[str]
    dev_labels: np.ndarray
    docs: np.ndarray | None  # teacher document embeddings scored by kl / margin_mse (triples' passages)
    pairs: np.ndarray | None  # triples: (positive row, negative row) into docs, int64
    margins: np.ndarray | None  # triples: the file's score margins
    facts: dict


def teacher_targets(teacher, label, train_texts, dev_texts, triples, augment: int, seed: int) -> Targets:
    """The teacher's targets. `label(texts)` returns (cached teacher query embeddings, cached?); with triples the
    training texts are the triples' queries and pairs/margins point into the passages' teacher embeddings."""
    facts, docs, pairs, margins = {"augmented_variants": 0}, None, None, None
    if augment:
        mask = teacher.tokenizer.mask_token or "[MASK]"
        variants = training_text.augment_queries(train_texts, augment, mask, seed)
        train_texts, facts["augmented_variants"] = train_texts + variants, len(variants)
    if triples is not None:
        queries, passages, rows = triples
        unique = list(dict.fromkeys(queries))
        emb, facts["train_labels_cached"] = label(unique)
        at = {q: i for i, q in enumerate(unique)}
        train_texts, train_emb = queries, emb[[at[q] for q in queries]]
        pairs = np.asarray([[int(r[0]), int(r[1])] for r in rows], np.int64)
        margins = np.asarray([r[2] for r in rows], np.float32)
        with torch.inference_mode():  # the teacher's document side, at its own length, for the triples' passages
            docs = teacher.encode_document(passages, batch_size=32, show_progress_bar=True)
    else:
        train_emb, facts["train_labels_cached"] = label(train_texts)
    dev_emb, facts["dev_labels_cached"] = label(dev_texts)
    facts["teacher_label_runs"] = sum(not facts[k] for k in ("train_labels_cached", "dev_labels_cached"))
    return Targets(train_texts, train_emb, dev_texts, dev_emb, docs, pairs, margins, facts)


def with_score_terms(
    targets: Targets,
    weights: dict,
    top_k: int,
    negatives: int,
    similarity: str,
    temperature: float,
    seed: int,
    margin_scale: float,
):
    """(targets, the loss's settings, the evaluator's score settings) for the objective `weights`.

    With kl / margin_mse, each training query's teacher top-k documents are fixed, so they are found once here
    (faiss, chunked; a triples-only Margin-MSE run scores the file's documents and needs none), kept by the loss
    as int64 arrays, and each label row becomes [teacher embedding | its row].
    """
    settings = {
        "docs": targets.docs,
        "similarity": similarity,
        "temperature": temperature,
        "targets": None,
        "negatives": negatives,
        "seed": seed,
        "margin_scale": margin_scale,
    }
    if not set(weights) & set(losses.SCORE_TERMS):
        return targets, settings, None
    if len(targets.texts) >= 2**24:  # the row index rides in the float32 label: exact below 2^24
        raise UsageError(f"{len(targets.texts)} training texts with score terms: at most {2**24 - 1} are supported")
    t0 = time.perf_counter()
    train_top = "kl" in weights or targets.pairs is None
    top, score = losses.score_targets(
        targets.labels, targets.dev_labels, targets.docs, top_k, negatives, similarity, temperature, seed, train_top
    )
    settings["targets"] = losses.ScoreTargets(top, targets.pairs, targets.margins)
    targets.facts["candidate_seconds"] = round(time.perf_counter() - t0, 2)
    rows = np.arange(len(targets.texts), dtype=np.float32)[:, None]
    return targets._replace(labels=np.concatenate([targets.labels, rows], 1)), settings, score


def training_arguments(
    run_dir: Path, settings: TrainSettings, steps: int, best_metric: str, device: str, prompt: str, batch_sampler=None
):
    from sentence_transformers import SentenceTransformerTrainingArguments

    eval_steps = min(settings.eval_steps, steps)
    return SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=min(settings.warmup_steps, steps // 10),  # capped at 10% of the run
        num_train_epochs=settings.num_train_epochs,
        adam_epsilon=settings.adam_epsilon,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        data_seed=settings.seed,
        fp16=settings.fp16,
        bf16=settings.bf16,
        use_cpu=device == "cpu",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        load_best_model_at_end=True,
        greater_is_better=True,
        report_to="none",
        metric_for_best_model=best_metric,
        # the labels are encode_query(prompt + text): the student trains on exactly those inputs
        prompts={"query": prompt} if prompt else None,
        **({"batch_sampler": batch_sampler} if batch_sampler is not None else {}),
    )


def batches_per_step(device: str, world: int) -> int:
    """Per-device batches in one optimiser step: one per torchrun process, or one per GPU when a single process
    sees several (the trainer wraps the student in DataParallel)."""
    in_process = torch.cuda.device_count() if device == "cuda" and world == 1 else 1
    return world * max(1, in_process)


def train(
    student,
    run_dir,
    texts,
    labels,
    evaluator,
    loss,
    settings: TrainSettings,
    best_metric: str,
    device: str,
    resume,
    world: int = 1,
    prompt: str = "",
) -> dict:
    """Train with SentenceTransformerTrainer; the best validation checkpoint is loaded at the end."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer

    per_step = settings.per_device_train_batch_size * batches_per_step(device, world)
    steps = max(1, int(-(-len(texts) // per_step) * settings.num_train_epochs))
    sampler = None
    if settings.group_by_length:
        from qdistill import batching

        sampler = batching.length_grouped(student.tokenizer, texts, encoders.length_limit(student))
    targs = training_arguments(run_dir, settings, steps, best_metric, device, prompt, sampler)
    logger.info(
        "training %s: %d texts, %d steps (warmup %d), lr %g, query prompt %r",
        run_dir.name,
        len(texts),
        steps,
        targs.warmup_steps,
        settings.learning_rate,
        prompt,
    )
    ds = Dataset.from_dict({"query": texts, "label": labels})
    trainer = SentenceTransformerTrainer(model=student, args=targs, train_dataset=ds, loss=loss, evaluator=evaluator)
    if resume:
        logger.info("resuming from %s", resume)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    secs = time.perf_counter() - t0
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "train_texts": len(texts),
        "train_prompt": prompt,
        "train_steps": out.global_step,
        "warmup_steps": targs.warmup_steps,
        "train_seconds": round(secs, 1),
        "train_texts_per_second": round(len(texts) * settings.num_train_epochs / secs, 1),
        "train_loss": out.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": resume,
        "log_history": trainer.state.log_history,
        **peak,
    }


def train_one(
    student, run_dir, texts, labels, evaluator, loss, settings, device, resume, sources, rank=0, world=1, prompt=""
) -> dict:
    """Train one student, save the best validation checkpoint as final/ with its training-text record, and
    return its metrics."""
    # the best checkpoint by MSE to the teacher, or by KL when only score terms are trained
    embed = not isinstance(loss, losses.QueryDistillLoss) or set(loss.weights) & set(losses.EMBED_TERMS)
    best = "eval_dev_negative_mse" if embed else "eval_dev_negative_kl"
    initial = evaluator(student)
    trained = train(student, run_dir, texts, labels, evaluator, loss, settings, best, device, resume, world, prompt)
    final = evaluator(student)
    if rank == 0:
        with run_files.atomic_dir(run_dir / "final") as tmp:
            student.save(str(tmp), model_name=run_dir.name)
            # travels with the model: evaluate_retrieval.py marks collections whose text it trained on as in-domain
            run_files.write_json(tmp / run_files.TRAINING_TEXT, sources)
    metrics = {
        "num_dev_queries": len(evaluator.target_sentences),
        "initial_dev_mse": -initial["dev_negative_mse"] / 100,
        "initial_dev_cosine": initial["dev_cosine"],
        "dev_mse": -final["dev_negative_mse"] / 100,
        "dev_cosine": final["dev_cosine"],
        **trained,
    }
    if "dev_negative_kl" in final:
        metrics.update(initial_dev_kl=-initial["dev_negative_kl"], dev_kl=-final["dev_negative_kl"])
    logger.info(
        "%s: dev MSE %.3e -> %.3e, cosine to teacher %.3f -> %.3f; saved %s",
        run_dir.name,
        metrics["initial_dev_mse"],
        metrics["dev_mse"],
        metrics["initial_dev_cosine"],
        metrics["dev_cosine"],
        run_dir / "final",
    )
    if not (metrics["dev_cosine"] > metrics["initial_dev_cosine"]):  # NaN-safe: a diverged run says so
        logger.warning(
            "%s: validation cosine fell from %.3f to %.3f: training diverged; lower --learning_rate (a pretrained "
            "6-layer student into another model's space diverged at 1e-3 here)",
            run_dir.name,
            metrics["initial_dev_cosine"],
            metrics["dev_cosine"],
        )
    return metrics


def check_hub(repo_id: str) -> None:
    """Before any training: the hub answers and a token is set (whoami), so --push_to_hub fails first, not last."""
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as e:  # noqa: BLE001 - no network, no token, a bad token: all one line
        raise UsageError(
            f"--push_to_hub {repo_id}: the Hugging Face hub cannot be reached or no token is set "
            f"({str(e).splitlines()[0][:100]}); run `huggingface-cli login` where the hub is reachable, "
            "or drop the flag"
        ) from None


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload the saved final/ (weights, model card, training_text.json), not the in-memory model."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="query encoder distillation")
