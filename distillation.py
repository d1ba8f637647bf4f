"""Distill a small student query encoder from a frozen dual-encoder teacher.

The teacher's document encoder and index stay as they are; the student learns to put each query where
the teacher would (MSE or cosine between student and teacher query embeddings, optionally score terms).

    # 2-layer [0, L-1] student of all-MiniLM-L6-v2 on MS MARCO train queries
    python distillation.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 --num_layers 2 \\
        --train_queries msmarco
    # explicit layers, on a local query file
    python distillation.py --teacher_model sentence-transformers/all-mpnet-base-v2 --layers 0 11 \\
        --train_queries $DATA_DIR/queries/msmarco-train-sample.tsv --output_path output
    # other small pretrained models as students: output/<run_name>/<student>/ each
    python distillation.py --teacher_model T --student_model_init pretrained --student_model_init_list M1 M2

Outputs: output/<run_name>/{config.json, final/, metrics.json, checkpoints/}; teacher labels are cached
under output/labels/. Several GPUs: `torchrun --nproc_per_node 4 distillation.py ...` (the trainer's DDP).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import cache
import common
import data
import loading
import losses
import recipes
import students
from common import UsageError, positive, positive_int, share

logger = logging.getLogger("qdistill.distillation")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument_group("teacher and student").add_argument
    add("--teacher_model", default=common.PAPER_TEACHER, help="HF id or local SentenceTransformer folder")
    add("--student_model_init", default="layer_reduction", choices=["layer_reduction", "pretrained", "static"])
    add("--layers", type=int, nargs="+", help="teacher layer ids to keep, e.g. 0 11")
    add("--num_layers", type=positive_int, default=2, help="layers to keep when --layers is not given")
    add("--layer_strategy", default="top_bottom", choices=students.STRATEGIES)
    add("--student_model_init_list", nargs="+", default=[], help="pretrained students: one <run_name>/<student> each")
    add("--student_dropout", type=float, default=None, help="default: the recipe's (best: 0; paper: the teacher's)")
    add("--freeze_embeddings", action=argparse.BooleanOptionalAction, default=None,
        help="keep the token embeddings fixed (cheaper steps); default: the recipe's (best: on)")  # fmt: skip
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
    add("--data_dir", default=common.DATA_DIR, help="downloads and assembled offline models go here")
    add("--max_seq_length", type=positive_int, default=128, help="query max length (labels and student)")
    add("--augment", type=int, default=0, choices=range(11), metavar="0..10", help="perturbed variants per query")
    add = p.add_argument_group("objective").add_argument
    add("--loss", default=None, type=losses.parse_loss, help="mse, cosine, or weighted terms, e.g. mse:1.0,kl:5.0")
    add("--token_loss_weight", type=float, default=0.0, help="also match the teacher's last-layer token states")
    add("--score_corpus", default=None, help="BEIR folder or collection tsv for kl/margin_mse (not an eval set)")
    add("--kl_temperature", type=positive, default=0.05)
    add("--kl_top_k", type=positive_int, default=32, help="teacher top-k documents per query")
    add("--kl_negatives", type=positive_int, default=32, help="random corpus documents added per query")
    add("--margin_triples", default=None, help="pos<TAB>neg<TAB>qid<TAB>pid_pos<TAB>pid_neg (Margin-MSE)")
    add("--triples_collection", default=None, help="pid<TAB>text passages for --margin_triples")
    add("--margin_scale", type=positive, default=1.0, help="scales the file's margins to the teacher's range")
    add = p.add_argument_group("training (unset: the recipe's value)").add_argument
    add("--recipe", default="best", choices=sorted(recipes.RECIPES),
        help="best: the recipe measured best here (cosine, lr 1e-3, batch 64, 4 epochs, frozen embeddings,\n"
        "dropout 0, grouped batches); paper: mse, lr 1e-4, batch 128, warm-up 1000, 1 epoch")  # fmt: skip
    add("--per_device_train_batch_size", "--train_batch_size", type=positive_int, default=None)
    add("--per_device_eval_batch_size", "--eval_batch_size", type=positive_int, default=128)
    add("--learning_rate", type=positive, default=None)
    add("--warmup_steps", type=int, default=None, help="capped at 10%% of the run's steps")
    add("--num_train_epochs", type=positive, default=None)
    add("--adam_epsilon", type=positive, default=1e-6)
    add("--weight_decay", type=float, default=0.01)
    add("--group_by_length", action=argparse.BooleanOptionalAction, default=None,
        help="batches of similar token length (less padding); --no-group_by_length: random batches")  # fmt: skip
    add("--eval_steps", type=positive_int, default=500)
    add("--logging_steps", type=positive_int, default=50)
    add("--save_total_limit", type=positive_int, default=2)
    add("--seed", type=int, default=42)
    add("--fp16", action="store_true", help="CUDA only")
    add("--bf16", action="store_true", help="CUDA only")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    add("--label_batch_size", type=positive_int, default=256)
    add("--label_devices", nargs="+", default=None, help="several devices: multi-process teacher labelling")
    add = p.add_argument_group("output").add_argument
    add("--output_path", default="output")
    add("--run_name", default=None, help="default: derived from teacher and student")
    add("--overwrite_output_dir", action="store_true")
    add("--skip_finished", action="store_true",
        help="keep a run whose final/ was made by the same recipe (flags and data content); retrain others")  # fmt: skip
    add("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' (newest complete one)")
    add("--save_asymmetric", action="store_true", help="also save <run>/asymmetric: student queries, teacher docs")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None)
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    recipes.resolve(args, args.student_model_init)
    if args.student_model_init == "pretrained" and not args.student_model_init_list:
        p.error("--student_model_init pretrained needs --student_model_init_list M1 [M2 ...]")
    if args.student_model_init_list and args.student_model_init != "pretrained":
        p.error("--student_model_init_list goes with --student_model_init pretrained")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    if set(args.loss) & set(losses.SCORE_TERMS) and not (args.score_corpus or args.margin_triples):
        p.error("--loss terms kl/margin_mse need --score_corpus (a BEIR folder or collection tsv) or --margin_triples")
    if args.margin_triples and args.score_corpus:
        p.error("--margin_triples scores against its own --triples_collection; drop --score_corpus")
    if args.margin_triples and not args.triples_collection:
        p.error("--margin_triples needs --triples_collection (pid<TAB>text)")
    if args.margin_triples and args.augment:
        p.error("--augment applies to plain query training, not to --margin_triples")
    if args.student_dropout is not None and not 0 <= args.student_dropout < 1:
        p.error("--student_dropout must be in [0, 1)")
    if args.token_loss_weight and args.student_model_init != "layer_reduction":
        p.error("--token_loss_weight needs --student_model_init layer_reduction (same tokenizer and width)")
    if not 0 <= args.token_loss_weight < float("inf"):  # nan fails this too: it would train to a NaN final/
        p.error("--token_loss_weight must be a finite number >= 0")
    if args.span_words and args.span_words[0] > args.span_words[1]:
        p.error(f"--span_words MIN MAX: {args.span_words[0]} > {args.span_words[1]}; give the shorter length first")
    specs = [q for q in args.train_queries]
    if len(set(specs)) != len(specs):
        dup = next(q for q in specs if specs.count(q) > 1)
        p.error(f"--train_queries names {dup} twice; give each source once (shares are split evenly)")
    if args.freeze_embeddings and args.student_model_init == "static":
        p.error("--freeze_embeddings would leave a static student nothing to train; drop it")
    if args.warmup_steps < 0:
        p.error("--warmup_steps must be >= 0")
    return args


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: trainer_state.json is written last, so a killed save has none."""
    done = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file() and c.name[11:].isdigit()]
    return max(done, key=lambda c: int(c.name[11:]), default=None)


def resume_point(run_dir: Path, resume: str | None) -> str | None:
    if resume is None:
        return None
    path = latest_checkpoint(run_dir / "checkpoints") if resume == "latest" else Path(resume)
    if path is None:
        raise UsageError(f"no complete checkpoint under {run_dir / 'checkpoints'}; drop --resume_from_checkpoint")
    if not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no trainer_state.json)")
    return str(path)


def run_names(init: str, inits: list[str], run_name: str | None, teacher: str, layers: list[int] | None) -> list:
    """(student init, run folder name) per student: <run_name>/<student> for pretrained ones, unique names."""
    teacher = common.slug(Path(teacher).name)
    if init != "pretrained":
        default = f"{teacher}-static" if init == "static" else f"{teacher}-L{'-'.join(map(str, layers or []))}"
        return [(init, run_name or default)]
    names = [common.slug(Path(m).name) for m in inits]
    names = [n if names[:i].count(n) == 0 else f"{n}~{names[:i].count(n) + 1}" for i, n in enumerate(names)]
    return [(m, f"{run_name or teacher + '-pretrained'}/{n}") for m, n in zip(inits, names)]


# flags that change where and how a run is written or logged, never the student it trains
NOT_RECIPE = {"explicit_flags", "log_level", "overwrite_output_dir", "skip_finished", "resume_from_checkpoint", "push_to_hub",
              "hub_model_id", "label_batch_size", "label_devices", "per_device_eval_batch_size", "output_path",
              "data_dir", "device", "run_name", "teacher_model", "train_queries", "score_corpus", "dev_queries",
              "margin_triples", "triples_collection", "save_asymmetric"}  # fmt: skip


def recipe(args, sources: dict, teacher_path: Path, init: str) -> dict:
    """Everything that makes the student: the flags that change training, and the content (not the names) of the
    teacher, the training text sources, the validation queries and the triples. Equal recipes, equal students."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE}
    files = {"dev_queries": args.dev_queries, "margin_triples": args.margin_triples}
    return json.loads(json.dumps({
        "flags": flags,
        "student_init": init if init in ("layer_reduction", "static") else cache.model_fingerprint(
            loading.resolve_model_path(init, args.data_dir)),
        "teacher_fingerprint": cache.model_fingerprint(teacher_path),
        "sources": sources,
        **{k: cache.sha256_file(v) if v else None for k, v in files.items()},
    }, sort_keys=True, default=str))  # fmt: skip


def finished_with(run_dir: Path, wanted: dict) -> bool:
    """A run folder holds a finished student (final/, metrics.json) made by exactly this recipe."""
    try:
        done = json.loads((run_dir / "metrics.json").read_text())["config"].get("recipe")
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    if (run_dir / "final" / "modules.json").is_file() and done == wanted:
        return True
    logger.info("%s holds a run of another recipe (or an unfinished one): it is trained again", run_dir)
    return False


def plan_runs(names, output_path, overwrite: bool, resume: str | None, skip: bool = False) -> list[dict]:
    """One entry per student: its run folder (refused when it holds another run) and its resume point."""
    plans = []
    for init, name in names:
        run_dir = Path(output_path) / name
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (overwrite or resume or skip):
            raise UsageError(f"{run_dir} exists and is not empty; pass --overwrite_output_dir or another --run_name")
        plans.append({"init": init, "run_dir": run_dir, "resume": resume_point(run_dir, resume)})
    return plans


def train(student, run_dir, texts, labels, evaluator, loss, hp: dict, best_metric: str, device: str, resume,
          world: int = 1, prompt: str = "") -> dict:  # fmt: skip
    """Train with SentenceTransformerTrainer; the best validation checkpoint is loaded at the end.

    prompt: the teacher's query prompt. The labels are encode_query(prompt + text) and the student will serve
    prompt + text too (its folder keeps the prompts), so it trains on exactly those inputs.
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    # one process with several GPUs: the trainer wraps the student in DataParallel, one batch per GPU per step
    in_process = torch.cuda.device_count() if device == "cuda" and world == 1 else 1
    per_step = hp["per_device_train_batch_size"] * world * max(1, in_process)
    steps = max(1, int(-(-len(texts) // per_step) * hp["num_train_epochs"]))
    warmup, eval_steps = min(hp.pop("warmup_steps"), steps // 10), min(hp.pop("eval_steps"), steps)
    if hp.pop("group_by_length"):
        import batching

        hp["batch_sampler"] = batching.length_grouped(student.tokenizer, texts, loading.length_limit(student))
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        **hp,
        warmup_steps=warmup,
        data_seed=hp["seed"],
        use_cpu=device == "cpu",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        load_best_model_at_end=True,
        greater_is_better=True,
        report_to="none",
        metric_for_best_model=best_metric,
        prompts={"query": prompt} if prompt else None,
    )
    logger.info("training %s: %d texts, %d steps (warmup %d), lr %g, query prompt %r", run_dir.name, len(texts),
                steps, warmup, hp["learning_rate"], prompt)  # fmt: skip
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
        "warmup_steps": warmup,
        "train_seconds": round(secs, 1),
        "train_texts_per_second": round(len(texts) * hp["num_train_epochs"] / secs, 1),
        "train_loss": out.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": resume,
        "log_history": trainer.state.log_history,
        **peak,
    }


def teacher_targets(teacher, label, train_texts, dev_texts, triples, augment: int, seed: int):
    """(texts, teacher embeddings, extra label columns, dev embeddings, triples' passage embeddings, facts).

    `label(texts)` returns cached teacher query embeddings; with triples the texts are the triples' queries
    and the extra columns [pos row, neg row, margin] point into the passages' teacher embeddings.
    """
    facts, docs, extra = {"augmented_variants": 0}, None, None
    if augment:
        variants = data.augment_queries(train_texts, augment, teacher.tokenizer.mask_token or "[MASK]", seed)
        train_texts, facts["augmented_variants"] = train_texts + variants, len(variants)
    if triples is not None:
        queries, passages, rows = triples
        unique = list(dict.fromkeys(queries))
        emb, facts["train_labels_cached"] = label(unique)
        at = {q: i for i, q in enumerate(unique)}
        train_texts, train_emb, extra = queries, emb[[at[q] for q in queries]], np.asarray(rows, np.float32)
        with torch.inference_mode():  # the teacher's document side, at its own length, for the triples' passages
            docs = teacher.encode_document(passages, batch_size=32, show_progress_bar=True)
    else:
        train_emb, facts["train_labels_cached"] = label(train_texts)
    dev_emb, facts["dev_labels_cached"] = label(dev_texts)
    return train_texts, train_emb, extra, dev_emb, docs, facts


class Inputs(NamedTuple):
    """What check_inputs read and resolved, before any model loads."""

    sources: dict  # the training-text record (training_text.json), without the text hashes
    train: list[str]
    dev: list[str]
    triples: tuple | None
    score_corpus: tuple | None
    teacher_path: Path
    plans: list[dict]


def _corpus_record(spec: str, file: Path, role: str, texts: int) -> dict:
    return {"spec": spec, "corpus_file": str(file.resolve()), "corpus_sha256": cache.sha256_file(file),
            "role": role, "texts": texts}  # fmt: skip


def check_inputs(args, device: str) -> Inputs:
    """Everything a user can get wrong, checked before any model loads or any folder is made."""
    if (args.fp16 or args.bf16) and not device.startswith("cuda"):
        raise UsageError(f"--fp16/--bf16 need a CUDA GPU, but the device is {device}")
    if device.startswith("cuda:") and device != "cuda:0" and common.rank_world()[1] == 1:
        # the trainer places the model on the process's default GPU, whatever --device says: the teacher (and
        # the token loss) would sit on one GPU and the student on another
        raise UsageError(f"--device {device}: select the GPU with CUDA_VISIBLE_DEVICES={device[5:]} and --device cuda")
    specs = [q for q in args.train_queries if not q.startswith("corpus:")]
    files = [data.msmarco_train_queries(args.data_dir) if q == "msmarco" else Path(q) for q in specs]
    corpora, seen = [], {}
    for spec in (q for q in args.train_queries if q.startswith("corpus:")):
        corpus, file, held_out = data.corpus_source(spec, args.data_dir)
        if file.resolve() in seen:  # corpus:scifact and corpus:$DATA_DIR/scifact are one source
            raise UsageError(f"{spec} and {seen[file.resolve()]} are the same collection; give it once")
        seen[file.resolve()] = spec
        corpora.append((spec, corpus, held_out, file))
    train, dev, counts = data.training_texts(files, [c[:3] for c in corpora], args.dev_queries,
                                             args.num_dev_queries, args.max_train_queries, args.corpus_text_share,
                                             args.seed, args.span_words, args.title_share)  # fmt: skip
    sources = {
        "query_files": [{"path": str(f.resolve()), "sha256": cache.sha256_file(f)} for f in files],
        "queries": counts.get("queries", 0),
        "corpora": [],
    }
    for spec, _, _, file in corpora:  # only sources that gave text mark a collection in-domain
        if counts[spec]:
            sources["corpora"].append(_corpus_record(spec, file, "training text", counts[spec]))
        else:
            logger.warning("%s gave no training text (--corpus_text_share %g); not recorded", spec,
                           args.corpus_text_share)  # fmt: skip
    triples = args.margin_triples and data.read_triples(args.margin_triples, files, args.triples_collection, train,
                                                        args.max_train_queries, args.seed)  # fmt: skip
    if triples:
        sources["corpora"].append(_corpus_record(args.triples_collection, Path(args.triples_collection),
                                                 "margin triples", len(triples[1])))  # fmt: skip
    score_corpus = data.load_corpus(args.score_corpus) if args.score_corpus else None
    if score_corpus:  # its documents train the student (kl / margin_mse): that collection is not zero-shot
        sources["corpora"].append(_corpus_record(args.score_corpus, score_corpus[1], "score corpus",
                                                 len(score_corpus[0])))  # fmt: skip
    teacher_path = loading.resolve_model_path(args.teacher_model, args.data_dir)
    for name in args.student_model_init_list:
        loading.resolve_model_path(name, args.data_dir)
    total = students.config_depth(teacher_path)  # the default run name holds the layer ids
    keep = sorted(args.layers) if args.layers else total and students.choose_layers(total, args.num_layers,
                                                                                    args.layer_strategy)  # fmt: skip
    names = run_names(args.student_model_init, args.student_model_init_list, args.run_name, args.teacher_model, keep)
    plans = plan_runs(names, args.output_path, args.overwrite_output_dir, args.resume_from_checkpoint,
                      args.skip_finished)  # fmt: skip
    for plan in plans:
        plan["recipe"] = recipe(args, sources, teacher_path, plan["init"])
        plan["done"] = args.skip_finished and finished_with(plan["run_dir"], plan["recipe"])
        run_dir = plan["run_dir"]
        if not plan["done"] and run_dir.is_dir() and any(run_dir.iterdir()) and not args.overwrite_output_dir:
            if not args.resume_from_checkpoint:
                raise UsageError(f"{run_dir} holds a run of another recipe; pass --overwrite_output_dir to retrain")
    return Inputs(sources, train, dev, triples or None, score_corpus, teacher_path, plans)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.start_run(args.log_level, args.seed, args.output_path)
    rank, world, device = common.distributed(common.pick_device(args.device))
    with common.main_first(rank):  # one download of the training queries, however many ranks
        inputs = check_inputs(args, device)
    done = [p for p in inputs.plans if p["done"]]
    for plan in done:
        logger.info("%s: finished earlier by the same recipe, kept (--skip_finished)", plan["run_dir"])
    plans = [p for p in inputs.plans if not p["done"]]
    results = [{**json.loads((p["run_dir"] / "metrics.json").read_text()), "reused": True} for p in done]
    if not plans:
        return {"runs": results}
    teacher, _ = loading.load_model(args.teacher_model, device, path=inputs.teacher_path)
    student_settings = {"layers": args.layers, "num_layers": args.num_layers, "strategy": args.layer_strategy,
                        "freeze_embeddings": args.freeze_embeddings and (
                        "freeze_embeddings" in args.explicit_flags or "if_any"), "dropout": args.student_dropout,
                        "max_seq_length": args.max_seq_length, "data_dir": args.data_dir,
                        "batch_size": args.label_batch_size}  # fmt: skip
    # built once, before labelling: bad layer ids and unloadable students fail before any expensive work
    built = [students.build_student(plan["init"], teacher, device, **student_settings) for plan in plans]
    logger.info("%d training texts (%s), %d validation texts", len(inputs.train), inputs.sources, len(inputs.dev))

    def label(texts):
        return cache.teacher_labels(teacher, inputs.teacher_path, texts, args.output_path, args.max_seq_length,
                                    args.label_batch_size, args.label_devices)  # fmt: skip

    # under torchrun every rank labels (and indexes) a share of the texts; rank 0 writes the caches
    t0 = time.perf_counter()
    texts, labels, extra, dev_labels, docs, facts = teacher_targets(teacher, label, inputs.train, inputs.dev,
                                                                    inputs.triples, args.augment, args.seed)  # fmt: skip
    if inputs.score_corpus is not None:
        corpus, file = inputs.score_corpus
        if (file.parent / "qrels").is_dir():
            logger.warning("--score_corpus %s is an evaluation dataset: results on it are in-domain", file.parent)
        docs, _, _ = cache.teacher_index(teacher, args.teacher_model, inputs.teacher_path, corpus, file,
                                         args.output_path)  # fmt: skip
    runs = sum(not facts[k] for k in ("train_labels_cached", "dev_labels_cached"))
    facts.update(world_size=world, teacher_label_runs=runs,
                 label_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    # the leak guard's input: which normalised texts trained the student (evaluation counts its queries among them)
    sources = {**inputs.sources, "text_hashes": data.text_hashes(texts)}
    similarity, score, top = loading.similarity_name(teacher), None, np.zeros((len(texts), 0), np.float32)
    if set(args.loss) & set(losses.SCORE_TERMS):  # each query's teacher top-k, found once here
        t0 = time.perf_counter()
        # a triples-only Margin-MSE run scores the file's documents: no training query needs its top-k
        train_top = "kl" in args.loss or inputs.triples is None
        top, score = losses.score_targets(labels, dev_labels, docs, args.kl_top_k, args.kl_negatives, similarity,
                                          args.kl_temperature, args.seed, train_top)  # fmt: skip
        facts["candidate_seconds"] = round(time.perf_counter() - t0, 2)
    # a label row: [teacher embedding | top-k doc rows (score terms) | pos row, neg row, margin (triples)]
    labels = np.concatenate([labels, top, *([] if extra is None else [extra])], 1)
    config = common.run_info(vars(args), device, argv, __file__)
    config.update(teacher_path=str(inputs.teacher_path), train_text_sources=inputs.sources, device=device,
                  world_size=world)  # fmt: skip
    hp = {k: getattr(args, k) for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
          "warmup_steps", "num_train_epochs", "adam_epsilon", "weight_decay", "eval_steps", "logging_steps",
          "save_total_limit", "seed", "fp16", "bf16", "group_by_length")}  # fmt: skip
    loss_settings = {"docs": docs, "similarity": similarity, "temperature": args.kl_temperature,
                     "top_k": top.shape[1], "negatives": args.kl_negatives, "seed": args.seed,
                     "margin_scale": args.margin_scale}  # fmt: skip
    prompt = cache.encoder_settings(teacher, "query")["prompt"]  # the prompt the labels were made with
    for plan, (student, info) in zip(plans, built):  # one student per plan, all trained on the same targets
        student.prompts = {**student.prompts, **dict(teacher.prompts)}  # it answers for the teacher's query side
        run_dir, run_config = plan["run_dir"], {**config, "student": info, "recipe": plan["recipe"]}
        if rank == 0 and (args.overwrite_output_dir or args.skip_finished) and not plan["resume"] and run_dir.exists():
            shutil.rmtree(run_dir)
        created = not run_dir.exists()
        try:
            if rank == 0:  # one writer; first, so a crashed run still says what it was
                common.write_json(run_dir / "config.json", run_config)
            loss = losses.make_loss(
                student, args.loss, teacher.get_embedding_dimension(), args.token_loss_weight, teacher, **loss_settings
            )
            evaluator = losses.make_evaluator(inputs.dev, dev_labels, args.per_device_eval_batch_size, score)
            metrics = train_one(student, run_dir, texts, labels, evaluator, loss, dict(hp), device, plan["resume"],
                                inherited_sources(sources, plan["init"]), rank, world, prompt)  # fmt: skip
        except BaseException:
            # a run that failed before its first checkpoint leaves nothing that blocks the corrected rerun
            if rank == 0 and created and not list(run_dir.glob("checkpoints/checkpoint-*")):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        metrics = {"run_dir": str(run_dir), "final_path": str(run_dir / "final"), **info, **facts, **metrics}
        if rank == 0:
            if args.save_asymmetric:  # the same query encoder, so the same training-text record beside it
                students.save_asymmetric(student, teacher, run_dir / "asymmetric", run_dir / "final")
            if args.push_to_hub:
                push_folder(run_dir / "final", f"{args.hub_model_id}-{run_dir.name}" if len(plans) > 1
                            else args.hub_model_id)  # fmt: skip
            # last: metrics.json with the recipe marks the run finished (--skip_finished reads it)
            common.write_json(run_dir / "metrics.json", {**metrics, "config": run_config})
        results.append(metrics)
    common.barrier()  # no rank leaves before rank 0 has written everything
    return {"runs": results}


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload the saved final/ (weights, model card, training_text.json), not the in-memory model."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="query encoder distillation")


def inherited_sources(sources: dict, init: str) -> dict:
    """The run's training text plus that of a student it starts from (an earlier run's final/, staged training).

    A collection whose text trained any stage stays in-domain for the final student.
    """
    before = common.text_sources(init)
    if before is None:
        return sources
    return {
        **sources,
        "query_files": sources["query_files"]
        + [f for f in before.get("query_files", []) if f not in sources["query_files"]],
        "corpora": sources["corpora"] + before.get("corpora", []),
        "text_hashes": sorted(set(sources.get("text_hashes", [])) | set(before.get("text_hashes", []))),
        "initialised_from": {"model": str(init), **before},
    }


def train_one(student, run_dir, texts, labels, evaluator, loss, hp, device, resume, sources, rank=0, world=1,
              prompt="") -> dict:  # fmt: skip
    """Train one student, save the best validation checkpoint as final/, and return its metrics."""
    # the best checkpoint by MSE to the teacher, or by KL when only score terms are trained
    embed = not isinstance(loss, losses.QueryDistillLoss) or set(loss.weights) & set(losses.EMBED_TERMS)
    initial = evaluator(student)
    trained = train(
        student,
        run_dir,
        texts,
        labels,
        evaluator,
        loss,
        hp,
        "eval_dev_negative_mse" if embed else "eval_dev_negative_kl",
        device,
        resume,
        world,
        prompt,
    )
    final = evaluator(student)
    if rank == 0:
        with common.atomic_dir(run_dir / "final") as tmp:
            student.save(str(tmp), model_name=run_dir.name)
            # travels with the model: evaluate_retrieval.py marks collections whose text it trained on as in-domain
            common.write_json(tmp / common.TRAINING_TEXT, sources)
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
    return metrics


if __name__ == "__main__":
    common.cli(main)
