"""Resolving distillation.py's flags into a recipe (the one module that reads the argparse namespace). Training
recipes: `--recipe best` (the default: the recipe this project measured best) and `--recipe paper`
(the paper's exact settings, for reproductions). Explicit flags override either; config.json records the
resolved values, the recipe's name and which flags were given.

best: cosine loss, lr 1e-3, batch 64, 4 epochs over the cached labels, frozen token embeddings, dropout 0,
length-grouped batches, 60% document text when `corpus:` sources are given. Measured on all-MiniLM-L6-v2 -> [0, 5]
(docs/experiments.md): 0.975 in-domain / 0.953 zero-shot retention at 12k texts, against 0.763 for the paper's
settings at 20k queries; and the mpnet [0, 11] student's 0.954 in-domain.
paper: mse, lr 1e-4, batch 128, warm-up 1000 steps, one epoch, random batches, the teacher's dropout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from qdistill import cli, encoders, losses, students, teacher_outputs
from qdistill.cli import positive, positive_int, share

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
    "allow_partial_index",  # the index's content is in sources either way
    "teacher_query_embeddings",
    "teacher_query_ids",
    "vectors_only",  # the teacher's fingerprint says it (the log's content)
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


# ----------------------------------------------------------------------------- distillation.py's flags


def add_flags(p) -> None:
    """Every distillation.py flag, in groups; unset recipe flags stay None until resolve() fills them."""
    for add_group in (_model_flags, _data_flags, _objective_flags, _training_flags, _output_flags):
        add_group(p)


def _model_flags(p) -> None:
    add = p.add_argument_group("teacher and student").add_argument
    add(
        "--teacher_model",
        default=None,
        help=f"HF id or local SentenceTransformer folder (default: {cli.PAPER_TEACHER}; none when the teacher is\n"
        "given as vectors: --teacher_query_embeddings without --teacher_model never loads a teacher)",
    )
    add(
        "--teacher_similarity",
        choices=["cosine", "dot"],
        default=None,
        help="a vectors-only teacher's score function (default: cosine when every logged vector is unit length)",
    )
    add(
        "--teacher_symmetric",
        action="store_true",
        help="a vectors-only teacher encodes queries and documents alike (one encoder, no prompts): --doc_index's\n"
        "stored vectors label the text of its documents (--score_corpus) as more training text",
    )
    add(
        "--truncate_dim",
        type=positive_int,
        default=None,
        help="Matryoshka: train on the first d dimensions of the teacher's vectors (renormalised for cosine)",
    )
    add("--student_model_init", default="layer_reduction", choices=["layer_reduction", "pretrained", "static"])
    add("--layers", type=int, nargs="+", help="teacher layer ids to keep, e.g. 0 11 (a pretrained student's own)")
    add("--num_layers", type=positive_int, default=2, help="layers to keep when --layers is not given")
    add("--layer_strategy", default="top_bottom", choices=students.STRATEGIES)
    add("--student_model_init_list", nargs="+", default=[], help="pretrained students: one <run_name>/<student> each")
    add("--student_dropout", type=float, default=None, help="default: the recipe's (best: 0; paper: the teacher's)")
    add(
        "--projection_init",
        default="lstsq",
        choices=["lstsq", "random"],
        help="a projected student's Dense layer (pretrained/static student of another width): the least-squares\n"
        "map from its features to the labels, fitted on up to 8,192 training texts, or random",
    )
    add(
        "--freeze_embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the token embeddings fixed (cheaper steps); default: the recipe's (best: on)",
    )


def _data_flags(p) -> None:
    add = p.add_argument_group("data").add_argument
    add(
        "--train_queries",
        nargs="+",
        default=["msmarco"],
        help="'msmarco', query files (tsv id<TAB>text, jsonl, txt), and corpus:<BEIR name, folder or collection tsv>\n"
        "(document text: titles and query-length windows); e.g. msmarco corpus:scifact",
    )
    add("--max_train_queries", type=positive_int, default=None, help="seeded sample of this many training texts")
    add("--corpus_text_share", type=share, default=None, help="share of training texts from corpus: sources")
    add("--span_words", type=positive_int, nargs=2, metavar=("MIN", "MAX"), help="window lengths (default: queries')")
    add("--title_share", type=share, default=0.3, help="share of document texts that are titles")
    add("--dev_queries", default=None, help="validation queries (default: a held-out training slice)")
    add("--num_dev_queries", type=positive_int, default=1000, help="size of the held-out slice")
    add("--data_dir", default=cli.DATA_DIR, help="downloads and assembled offline models go here")
    add("--max_seq_length", type=positive_int, default=128, help="query max length (labels and student)")
    add("--augment", type=int, default=0, choices=range(11), metavar="0..10", help="perturbed variants per query")
    add(
        "--teacher_query_embeddings",
        default=None,
        help="the teacher's query vectors you logged (.npy), used as labels: row i = the i-th id of\n"
        "--teacher_query_ids, or the i-th query of the one --train_queries file",
    )
    add("--teacher_query_ids", default=None, help="ids of --teacher_query_embeddings' rows, one a line")


def _objective_flags(p) -> None:
    add = p.add_argument_group("objective").add_argument
    add("--loss", default=None, type=losses.parse_loss, help="mse, cosine, or weighted terms, e.g. mse:1.0,kl:5.0")
    add("--token_loss_weight", type=float, default=0.0, help="also match the teacher's last-layer token states")
    add(
        "--align_loss_weight",
        type=float,
        default=0.0,
        help="also match, token by token, the student's hidden state after its layer j to the teacher's entering\n"
        "teacher layer keep[j+1] (masked MSE; layer-reduced students of 2+ layers)",
    )
    add("--score_corpus", default=None, help="BEIR folder or collection tsv for kl/margin_mse (not an eval set)")
    add(
        "--doc_index",
        default=None,
        help="for kl/margin_mse: the teacher's document index you have (pyserini folder, or faiss/.npy file with\n"
        "--doc_ids; flat or .npy); --score_corpus, if given, is the text a sample of it is checked against",
    )
    add("--doc_ids", default=None, help="ids of a --doc_index file, one a line")
    add(
        "--allow_partial_index",
        action="store_true",
        help="accept a --doc_index that lacks more than 1%% of --score_corpus's documents (fewer distractors)",
    )
    add("--kl_temperature", type=positive, default=0.05)
    add("--kl_top_k", type=positive_int, default=32, help="teacher top-k documents per query")
    add("--kl_negatives", type=positive_int, default=32, help="random corpus documents added per query")
    add("--margin_triples", default=None, help="pos<TAB>neg<TAB>qid<TAB>pid_pos<TAB>pid_neg (Margin-MSE)")
    add("--triples_collection", default=None, help="pid<TAB>text passages for --margin_triples")
    add("--margin_scale", type=positive, default=1.0, help="scales the file's margins to the teacher's range")


def _training_flags(p) -> None:
    add = p.add_argument_group("training (unset: the recipe's value)").add_argument
    add(
        "--recipe",
        default="best",
        choices=sorted(RECIPES),
        help="best: the recipe measured best here (cosine, lr 1e-3, batch 64, 4 epochs, frozen embeddings,\n"
        "dropout 0, grouped batches); paper: mse, lr 1e-4, batch 128, warm-up 1000, 1 epoch",
    )
    add("--per_device_train_batch_size", "--train_batch_size", type=positive_int, default=None)
    add("--per_device_eval_batch_size", "--eval_batch_size", type=positive_int, default=128)
    add("--learning_rate", type=positive, default=None)
    add("--warmup_steps", type=int, default=None, help="capped at 10%% of the run's steps")
    add("--num_train_epochs", type=positive, default=None)
    add("--adam_epsilon", type=positive, default=1e-6)
    add("--weight_decay", type=cli.non_negative, default=0.01)
    add(
        "--group_by_length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batches of similar token length (less padding); --no-group_by_length: random batches",
    )
    add("--eval_steps", type=positive_int, default=500)
    add("--logging_steps", type=positive_int, default=50)
    add("--save_total_limit", type=positive_int, default=2)
    add("--seed", type=cli.non_negative_int, default=42)
    add("--fp16", action="store_true", help="CUDA only")
    add("--bf16", action="store_true", help="CUDA only")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    add("--label_batch_size", type=positive_int, default=256)
    add("--label_devices", nargs="+", default=None, help="several devices: multi-process teacher labelling")


def _validate_vectors_only(p, args) -> None:
    """A teacher known only by its vectors: what needs its weights or its encoder is refused in one line."""
    if args.student_model_init == "layer_reduction":
        p.error(
            "layer reduction keeps the teacher's own layers, and a teacher known only by its vectors has none here: "
            "use --student_model_init pretrained (or static) --student_model_init_list MODEL"
        )
    if args.student_model_init == "static" and not args.student_model_init_list:
        p.error(
            "a static student of a vectors-only teacher needs a named model's tokenizer: --student_model_init_list M"
        )
    needs = {
        "augment": "--augment (perturbed queries have no logged vector)",
        "margin_triples": "--margin_triples (their passages need the teacher's encoder)",
        "token_loss_weight": "--token_loss_weight (the teacher's token states)",
        "align_loss_weight": "--align_loss_weight (the teacher's layers)",
        "save_asymmetric": "--save_asymmetric (the teacher's document encoder)",
    }
    for flag, what in needs.items():
        if getattr(args, flag):
            p.error(f"{what} needs the teacher's model; drop it, or give --teacher_model")
    corpora = [q for q in args.train_queries if q.startswith("corpus:")]
    if corpora:
        p.error(
            f"{corpora[0]}: document spans have no logged teacher vector; drop it (a symmetric teacher's documents "
            "can train through --teacher_symmetric --doc_index --score_corpus)"
        )
    if args.teacher_symmetric and not (args.doc_index and args.score_corpus):
        p.error("--teacher_symmetric labels documents' text by the index: give --doc_index and --score_corpus")
    if args.score_corpus and not args.doc_index:
        p.error("--score_corpus without --doc_index would need the teacher to encode it; give its --doc_index")


def _output_flags(p) -> None:
    add = p.add_argument_group("output").add_argument
    add("--output_path", default="output")
    add("--run_name", default=None, help="default: derived from teacher and student")
    add("--overwrite_output_dir", action="store_true")
    add(
        "--skip_finished",
        action="store_true",
        help="keep a run whose final/ was made by the same recipe (flags and data content); retrain others",
    )
    add("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' (newest complete one)")
    add("--save_asymmetric", action="store_true", help="also save <run>/asymmetric: student queries, teacher docs")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])


def validate(p, args) -> None:
    """Flag combinations that cannot work: argparse's exit 2 with one line, before anything runs."""
    if args.student_model_init == "pretrained" and not args.student_model_init_list:
        p.error("--student_model_init pretrained needs --student_model_init_list M1 [M2 ...]")
    args.vectors_only = bool(args.teacher_query_embeddings) and not args.teacher_model
    if args.vectors_only:
        _validate_vectors_only(p, args)
    else:
        if args.teacher_similarity or args.teacher_symmetric:
            p.error("--teacher_similarity/--teacher_symmetric describe a teacher known only by its vectors")
        args.teacher_model = args.teacher_model or cli.PAPER_TEACHER
    if args.student_model_init_list and args.student_model_init == "layer_reduction":
        p.error("--student_model_init_list goes with --student_model_init pretrained (or static on a named model)")
    if args.truncate_dim and args.student_model_init == "layer_reduction":
        p.error(
            "--truncate_dim: a layer-reduced student gives the teacher's full width; train it on full vectors and "
            "evaluate with evaluate_retrieval.py --truncate_dim, or use a pretrained student (projected to d)"
        )
    if args.student_model_init == "static" and len(args.student_model_init_list) > 1:
        p.error("--student_model_init static takes one model's tokenizer and per-token table")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    if set(args.loss) & set(losses.SCORE_TERMS) and not (args.score_corpus or args.doc_index or args.margin_triples):
        p.error(
            "--loss terms kl/margin_mse need --score_corpus (a BEIR folder or collection tsv), --doc_index or "
            "--margin_triples"
        )
    if args.margin_triples and (args.score_corpus or args.doc_index):
        p.error("--margin_triples scores against its own --triples_collection; drop --score_corpus/--doc_index")
    if args.doc_ids and not args.doc_index:
        p.error("--doc_ids goes with --doc_index (the index whose rows they name)")
    if args.doc_index and not set(args.loss) & set(losses.SCORE_TERMS) and not args.teacher_symmetric:
        p.error(
            "--doc_index serves the score terms (add kl or margin_mse to --loss, e.g. cosine:1.0,kl:1.0) or, for a "
            "symmetric vectors-only teacher, --teacher_symmetric"
        )
    if args.teacher_query_ids and not args.teacher_query_embeddings:
        p.error("--teacher_query_ids goes with --teacher_query_embeddings (the vectors whose rows they name)")
    if args.margin_triples and not args.triples_collection:
        p.error("--margin_triples needs --triples_collection (pid<TAB>text)")
    if args.margin_triples and args.augment:
        p.error("--augment applies to plain query training, not to --margin_triples")
    if args.student_dropout is not None and not 0 <= args.student_dropout < 1:
        p.error("--student_dropout must be in [0, 1)")
    if args.token_loss_weight and args.student_model_init != "layer_reduction":
        p.error("--token_loss_weight needs --student_model_init layer_reduction (same tokenizer and width)")
    for flag in ("token_loss_weight", "align_loss_weight"):  # nan fails this too: it would train to a NaN final/
        if not 0 <= getattr(args, flag) < float("inf"):
            p.error(f"--{flag} must be a finite number >= 0")
    if args.align_loss_weight and args.student_model_init != "layer_reduction":
        p.error("--align_loss_weight needs --student_model_init layer_reduction (the teacher's own layers)")
    if args.align_loss_weight and len(args.layers or range(args.num_layers)) < 2:
        p.error("--align_loss_weight aligns a student layer to the next kept teacher layer: keep 2 or more layers")
    if args.layers:
        if len(set(args.layers)) != len(args.layers) or min(args.layers) < 0:
            p.error(f"--layers {' '.join(map(str, args.layers))}: give distinct teacher layer ids >= 0")
        args.layers = sorted(args.layers)  # kept in teacher order: --layers 5 0 is the same student as 0 5
    if args.max_seq_length < 3:
        p.error("--max_seq_length must be >= 3: two special tokens and one word (tokenizers ignore less)")
    corpora = [q for q in args.train_queries if q.startswith("corpus:")]
    if corpora and args.corpus_text_share == 0:
        p.error(f"--corpus_text_share 0 gives {corpora[0]} no text; drop the corpus: sources or raise the share")
    if args.span_words and args.span_words[0] > args.span_words[1]:
        p.error(f"--span_words MIN MAX: {args.span_words[0]} > {args.span_words[1]}; give the shorter length first")
    specs = args.train_queries
    if len(set(specs)) != len(specs):
        dup = next(q for q in specs if specs.count(q) > 1)
        p.error(f"--train_queries names {dup} twice; give each source once (shares are split evenly)")
    if args.freeze_embeddings and args.student_model_init == "static":
        p.error("--freeze_embeddings would leave a static student nothing to train; drop it")
    if args.warmup_steps < 0:
        p.error("--warmup_steps must be >= 0")
