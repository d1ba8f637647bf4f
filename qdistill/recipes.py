"""Training recipes: `--recipe best` (the default: the recipe this project measured best) and `--recipe paper`
(the paper's exact settings, for reproductions). Explicit flags override either; config.json records the
resolved values, the recipe's name and which flags were given.

best: cosine loss, lr 1e-3, batch 64, 4 epochs over the cached labels, frozen token embeddings, dropout 0,
length-grouped batches, 60% document text when `corpus:` sources are given. Measured on all-MiniLM-L6-v2 -> [0, 5]
(docs/experiments.md): 0.975 in-domain / 0.953 zero-shot retention at 12k texts, against 0.763 for the paper's
settings at 20k queries; and the mpnet [0, 11] student's 0.954 in-domain.
paper: mse, lr 1e-4, batch 128, warm-up 1000 steps, one epoch, random batches, the teacher's dropout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qdistill import encoders, teacher_outputs

logger = logging.getLogger(__name__)

RECIPES = {
    "best": {
        "loss": {"cosine": 1.0},
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 64,
        "num_train_epochs": 4.0,
        "warmup_steps": 1000,
        "freeze_embeddings": True,
        "student_dropout": 0.0,
        "group_by_length": True,
        "corpus_text_share": 0.6,
    },
    "paper": {
        "loss": {"mse": 1.0},
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 128,
        "num_train_epochs": 1.0,
        "warmup_steps": 1000,
        "freeze_embeddings": False,
        "student_dropout": None,  # the teacher's
        "group_by_length": False,
        "corpus_text_share": 0.5,
    },
}


def resolve(args, student_init: str) -> None:
    """Fill every recipe setting the user left unset (None) from args.recipe, in place, and record which were
    given. A static student has no embedding layer apart from the rest: the recipe's frozen embeddings do not
    apply to it (an explicit --freeze_embeddings is still refused)."""
    preset = RECIPES[args.recipe]
    args.explicit_flags = sorted(k for k in preset if getattr(args, k) is not None)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if student_init == "static" and "freeze_embeddings" not in args.explicit_flags:
        args.freeze_embeddings = False


NOT_RECIPE = {
    "explicit_flags",
    "log_level",
    "overwrite_output_dir",
    "skip_finished",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
    "label_batch_size",
    "label_devices",
    "per_device_eval_batch_size",
    "output_path",
    "data_dir",
    "device",
    "run_name",
    "teacher_model",
    "train_queries",
    "score_corpus",
    "dev_queries",
    "margin_triples",
    "triples_collection",
    "save_asymmetric",
    # how a run is logged and checkpointed, and which other students share the call: not what this one is
    "logging_steps",
    "save_total_limit",
    "student_model_init_list",
    # by content below, not by name: the index's digest (sources) and the logged vectors' sha256
    "doc_index",
    "doc_ids",
    "teacher_query_embeddings",
    "teacher_query_ids",
}


def fingerprint(args, sources: dict, teacher_path: Path, init: str, batches_per_step: int = 1) -> dict:
    """Everything that makes the student: the flags that change training, the effective batch (per-device batch
    x devices), and the content (not the names) of the teacher, the training text sources, the validation
    queries and the triples. Equal recipes, equal students; logging and checkpoint-keeping change neither."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE}
    flags["effective_batch_size"] = args.per_device_train_batch_size * batches_per_step
    if flags.get("layers"):
        flags["layers"] = sorted(flags["layers"])  # the student keeps them in teacher order either way
    files = {
        "dev_queries": args.dev_queries,
        "margin_triples": args.margin_triples,
        "teacher_query_embeddings": args.teacher_query_embeddings,
        "teacher_query_ids": args.teacher_query_ids,
    }
    return json.loads(
        json.dumps(
            {
                "flags": flags,
                "student_init": init
                if init in ("layer_reduction", "static")
                else teacher_outputs.model_fingerprint(encoders.resolve_model_path(init, args.data_dir)),
                "teacher_fingerprint": teacher_outputs.model_fingerprint(teacher_path),
                "sources": sources,
                **{k: teacher_outputs.sha256_file(v) if v else None for k, v in files.items()},
            },
            sort_keys=True,
            default=str,
        )
    )


def finished_with(run_dir: Path, wanted: dict) -> bool:
    """A run folder holds a finished student made by exactly this recipe: metrics.json names the recipe and
    final/ loads (a folder missing its weights is not finished). Each other case is logged as what it is."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        if run_dir.is_dir():
            logger.info("%s holds no finished run (no metrics.json): it is trained again", run_dir)
        return False
    try:
        done = json.loads(metrics.read_text())["config"].get("recipe")
    except (ValueError, KeyError, AttributeError, TypeError):
        logger.warning("%s is damaged (not the JSON a finished run writes): the run is trained again", metrics)
        return False
    if done != wanted:
        logger.info("%s holds a run of another recipe: it is trained again", run_dir)
        return False
    try:
        from sentence_transformers import SentenceTransformer

        SentenceTransformer(str(run_dir / "final"), device="cpu")
    except Exception as e:  # noqa: BLE001 - any failure to load means the student is not there
        logger.warning("%s/final does not load (%s): the run is trained again", run_dir, str(e).splitlines()[0][:100])
        return False
    return True
