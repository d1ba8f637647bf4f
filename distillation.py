"""Distill a small student query encoder from a frozen dual-encoder teacher.

The teacher's document encoder and index stay as they are; the student learns to put each query where
the teacher would (MSE or cosine between student and teacher query embeddings, optionally score terms).

    # 2-layer [0, L-1] student of all-MiniLM-L6-v2 on MS MARCO train queries plus your documents' text,
    # with the recipe measured best here (--recipe best, the default)
    python distillation.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 --num_layers 2 \\
        --train_queries msmarco corpus:scifact
    # the paper's exact settings (mse, lr 1e-4, batch 128, one epoch), for reproductions
    python distillation.py --teacher_model sentence-transformers/all-mpnet-base-v2 --layers 0 11 --recipe paper
    # explicit layers, on a local query file
    python distillation.py --teacher_model sentence-transformers/all-mpnet-base-v2 --layers 0 11 \\
        --train_queries $DATA_DIR/queries/msmarco-train-sample.tsv --output_path output
    # other small pretrained models as students: output/<run_name>/<student>/ each
    python distillation.py --teacher_model T --student_model_init pretrained --student_model_init_list M1 M2
    # the teacher's query vectors you logged, as labels (no teacher pass; 64 re-encoded to check them)
    python distillation.py --teacher_model T --layers 0 11 --train_queries log.tsv \\
        --teacher_query_embeddings log_vectors.npy
    # score terms against the teacher index you have (nothing re-encoded; --score_corpus text checks it)
    python distillation.py --teacher_model T --loss cosine:1.0,kl:1.0 --doc_index my_pyserini_index \\
        --score_corpus $DATA_DIR/scifact
    python distillation.py --teacher_model T --student_model_init pretrained --student_model_init_list M1 M2

Outputs: output/<run_name>/{config.json, final/, metrics.json, checkpoints/}; teacher labels are cached
under output/labels/. Several GPUs: `torchrun --nproc_per_node 4 distillation.py ...` (the trainer's DDP).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from qdistill import (
    cli,
    data,
    encoders,
    given_index,
    index_check,
    losses,
    query_log,
    recipes,
    run_files,
    runs,
    students,
    teacher_outputs,
    torchrun,
    trainer,
    training_text,
)
from qdistill.cli import UsageError, positive, positive_int, share

logger = logging.getLogger("qdistill.distillation")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for add_flags in (_model_flags, _data_flags, _objective_flags, _training_flags, _output_flags):
        add_flags(p)
    args = p.parse_args(argv)
    recipes.resolve(args, args.student_model_init)
    _validate(p, args)
    return args


def _model_flags(p) -> None:
    add = p.add_argument_group("teacher and student").add_argument
    add("--teacher_model", default=cli.PAPER_TEACHER, help="HF id or local SentenceTransformer folder")
    add("--student_model_init", default="layer_reduction", choices=["layer_reduction", "pretrained", "static"])
    add("--layers", type=int, nargs="+", help="teacher layer ids to keep, e.g. 0 11")
    add("--num_layers", type=positive_int, default=2, help="layers to keep when --layers is not given")
    add("--layer_strategy", default="top_bottom", choices=students.STRATEGIES)
    add("--student_model_init_list", nargs="+", default=[], help="pretrained students: one <run_name>/<student> each")
    add("--student_dropout", type=float, default=None, help="default: the recipe's (best: 0; paper: the teacher's)")
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
        choices=sorted(recipes.RECIPES),
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


def _validate(p, args) -> None:
    """Flag combinations that cannot work: argparse's exit 2 with one line, before anything runs."""
    if args.student_model_init == "pretrained" and not args.student_model_init_list:
        p.error("--student_model_init pretrained needs --student_model_init_list M1 [M2 ...]")
    if args.student_model_init_list and args.student_model_init != "pretrained":
        p.error("--student_model_init_list goes with --student_model_init pretrained")
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
    if args.doc_index and not set(args.loss) & set(losses.SCORE_TERMS):
        p.error("--doc_index serves the score terms; add kl or margin_mse to --loss, e.g. cosine:1.0,kl:1.0")
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


class Inputs(NamedTuple):
    """What check_inputs read and resolved, before any model loads."""

    sources: dict  # the training-text record (training_text.json), without the text hashes
    train: list[str]
    dev: list[str]
    triples: tuple | None
    score_corpus: tuple | None
    teacher_path: Path
    plans: list[dict]
    doc_index: given_index.DocIndex | None  # the user's index for the score terms
    query_log: query_log.QueryLog | None  # the user's logged teacher query vectors


def check_inputs(args, device: str, world: int = 1) -> Inputs:
    """Everything a user can get wrong, checked before any model loads or any folder is made."""
    if args.push_to_hub:
        trainer.check_hub(args.hub_model_id)
    if (args.fp16 or args.bf16) and not device.startswith("cuda"):
        raise UsageError(f"--fp16/--bf16 need a CUDA GPU, but the device is {device}")
    if device.startswith("cuda:") and device != "cuda:0" and torchrun.rank_world()[1] == 1:
        # the trainer places the model on the process's default GPU, whatever --device says: the teacher (and
        # the token loss) would sit on one GPU and the student on another
        raise UsageError(f"--device {device}: select the GPU with CUDA_VISIBLE_DEVICES={device[5:]} and --device cuda")
    sources, train, dev, triples, score_corpus = training_text.read_sources(training_text.TextSettings.from_args(args))
    index = given_index.open_index(args.doc_index, args.doc_ids) if args.doc_index else None
    if index is not None:  # its documents train the student: collections evaluated on this index are in-domain
        sources["corpora"].append({"spec": args.doc_index, "index_digest": index.digest(), "role": "score index"})
    logged = None
    if args.teacher_query_embeddings:
        files = [Path(f["path"]) for f in sources["query_files"]]
        if args.teacher_query_ids and args.dev_queries:  # the log may hold the validation queries too
            files.append(Path(args.dev_queries))
        logged = query_log.QueryLog(args.teacher_query_embeddings, args.teacher_query_ids, files)
    teacher_path = encoders.resolve_model_path(args.teacher_model, args.data_dir)
    for name in args.student_model_init_list:
        encoders.resolve_model_path(name, args.data_dir)
    total = students.config_depth(teacher_path)  # the default run name holds the layer ids
    keep = (
        sorted(args.layers)
        if args.layers
        else total and students.choose_layers(total, args.num_layers, args.layer_strategy)
    )
    names = runs.run_names(
        args.student_model_init, args.student_model_init_list, args.run_name, args.teacher_model, keep
    )
    plans = runs.plan_runs(
        names,
        args.output_path,
        args.overwrite_output_dir,
        args.resume_from_checkpoint,
        lambda init: recipes.fingerprint(args, sources, teacher_path, init, trainer.batches_per_step(device, world)),
        args.skip_finished,
    )
    return Inputs(sources, train, dev, triples, score_corpus, teacher_path, plans, index, logged)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    rank, world, device = torchrun.distributed(cli.pick_device(args.device))
    with torchrun.main_first(rank):  # one download of the training queries, however many ranks
        inputs = check_inputs(args, device, world)
    done = [p for p in inputs.plans if p["done"]]
    for plan in done:
        logger.info("%s: finished earlier by the same recipe, kept (--skip_finished)", plan["run_dir"])
    plans = [p for p in inputs.plans if not p["done"]]
    results = [{**json.loads((p["run_dir"] / "metrics.json").read_text()), "reused": True} for p in done]
    if not plans:
        return {"runs": results}
    teacher, _ = encoders.load_model(args.teacher_model, device, path=inputs.teacher_path)
    check_given(args, inputs, teacher)  # the user's index and logged vectors belong to this teacher, or exit 2
    freeze = args.freeze_embeddings and ("freeze_embeddings" in args.explicit_flags or "if_any")
    student_settings = {
        "layers": args.layers,
        "num_layers": args.num_layers,
        "strategy": args.layer_strategy,
        "freeze_embeddings": freeze,
        "dropout": args.student_dropout,
        "max_seq_length": args.max_seq_length,
        "data_dir": args.data_dir,
        "batch_size": args.label_batch_size,
    }
    # built once, before labelling: bad layer ids and unloadable students fail before any expensive work
    built = [students.build_student(plan["init"], teacher, device, **student_settings) for plan in plans]
    logger.info("%d training texts (%s), %d validation texts", len(inputs.train), inputs.sources, len(inputs.dev))
    targets, loss_settings, score = prepare_targets(args, inputs, teacher, world)
    config = run_files.run_info(vars(args), device, argv, __file__)
    config.update(
        teacher_path=str(inputs.teacher_path), train_text_sources=inputs.sources, device=device, world_size=world
    )
    if inputs.doc_index is not None:
        config["doc_index"] = {"digest": inputs.doc_index.digest(), **inputs.doc_index.verification}
    if inputs.query_log is not None:
        config["teacher_query_embeddings"] = inputs.query_log.verification
    # the leak guard's input: which normalised texts trained the student (evaluation counts its queries among them)
    sources = {**inputs.sources, "text_hashes": data.text_hashes(targets.texts)}
    for plan, (student, info) in zip(plans, built):  # one student per plan, all trained on the same targets
        run = {**plan, "config": {**config, "student": info, "recipe": plan["recipe"]}, "info": info}
        results.append(
            run_plan(
                args,
                run,
                student,
                teacher,
                targets,
                loss_settings,
                score,
                sources,
                device,
                rank,
                world,
                multi=len(plans) > 1,
            )
        )
    torchrun.barrier()  # no rank leaves before rank 0 has written everything
    return {"runs": results}


def check_given(args, inputs: Inputs, teacher) -> None:
    """A given --doc_index and --teacher_query_embeddings checked against the teacher on seeded samples, before
    any labelling or training: one error line when they were made by another model, prompt or length."""
    sim, name = encoders.similarity_name(teacher), args.teacher_model
    if inputs.doc_index is not None:
        index_check.check_shape(inputs.doc_index, teacher.get_embedding_dimension(), sim, name)
        corpus = inputs.score_corpus[0] if inputs.score_corpus else None

        def encode_documents(ids):
            return teacher.encode_document([teacher_outputs.doc_text(corpus[i]) for i in ids], convert_to_numpy=True)

        index = inputs.doc_index
        index.verification = index_check.verify(index, encode_documents, corpus, sim, name, args.seed)
    if inputs.query_log is not None:

        def encode_queries(texts):
            with encoders.max_length(teacher, args.max_seq_length):
                return teacher.encode_query(texts, convert_to_numpy=True)

        inputs.query_log.verify(encode_queries, sim, name, args.seed)


def prepare_targets(args, inputs: Inputs, teacher, world: int):
    """(trainer.Targets, the loss's settings, the evaluator's score settings): labels from the user's logged
    vectors, the cache or the teacher (under torchrun every rank labels a share; rank 0 writes the caches), and
    score terms' targets (against the user's index, or one built from --score_corpus)."""

    def teacher_label(texts):
        return teacher_outputs.teacher_labels(
            teacher,
            inputs.teacher_path,
            texts,
            args.output_path,
            args.max_seq_length,
            args.label_batch_size,
            args.label_devices,
        )

    def label(texts):
        if inputs.query_log is None:
            return teacher_label(texts)
        emb, missing = inputs.query_log.lookup(texts)
        logger.info("%d of %d texts labelled by the logged vectors", len(texts) - len(missing), len(texts))
        if not missing:
            return emb, True
        emb[missing], cached = teacher_label([texts[i] for i in missing])
        return emb, cached

    t0 = time.perf_counter()
    targets = trainer.teacher_targets(
        teacher, label, inputs.train, inputs.dev, inputs.triples, args.augment, args.seed
    )
    if inputs.doc_index is not None:  # the user's index: its stored vectors, nothing encoded
        targets = targets._replace(docs=inputs.doc_index.all_vectors())
    elif inputs.score_corpus is not None:
        corpus, file = inputs.score_corpus
        if (file.parent / "qrels").is_dir():
            logger.warning("--score_corpus %s is an evaluation dataset: results on it are in-domain", file.parent)
        docs, _, _ = teacher_outputs.teacher_index(
            teacher, args.teacher_model, inputs.teacher_path, corpus, file, args.output_path
        )
        targets = targets._replace(docs=docs)
    targets.facts.update(world_size=world, label_seconds=round(time.perf_counter() - t0, 1))
    return trainer.with_score_terms(
        targets,
        args.loss,
        args.kl_top_k,
        args.kl_negatives,
        encoders.similarity_name(teacher),
        args.kl_temperature,
        args.seed,
        args.margin_scale,
    )


def run_plan(args, run, student, teacher, targets, loss_settings, score, sources, device, rank, world, multi):
    """Train one planned student into its run folder; a run that fails before its first checkpoint leaves
    nothing that blocks the corrected rerun."""
    run_dir, info = run["run_dir"], run["info"]
    # the prompt the labels were made with (every student carries the teacher's prompts: students.build_student)
    prompt = teacher_outputs.encoder_settings(teacher, "query")["prompt"]
    if rank == 0 and args.overwrite_output_dir and not run["resume"] and run_dir.exists():
        shutil.rmtree(run_dir)
    created = not run_dir.exists()
    try:
        if rank == 0:  # one writer; first, so a crashed run still says what it was
            run_files.write_json(run_dir / "config.json", run["config"])
        dim = teacher.get_embedding_dimension()
        loss = losses.make_loss(
            student,
            args.loss,
            dim,
            args.token_loss_weight,
            teacher,
            args.align_loss_weight,
            run["info"].get("layers"),
            **loss_settings,
        )
        evaluator = losses.make_evaluator(
            targets.dev_texts, targets.dev_labels, args.per_device_eval_batch_size, score
        )
        metrics = trainer.train_one(
            student,
            run_dir,
            targets.texts,
            targets.labels,
            evaluator,
            loss,
            trainer.TrainSettings.from_args(args),
            device,
            run["resume"],
            training_text.inherited_sources(sources, run["init"]),
            rank,
            world,
            prompt,
        )
    except BaseException:
        if rank == 0 and created and not list(run_dir.glob("checkpoints/checkpoint-*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    metrics = {"run_dir": str(run_dir), "final_path": str(run_dir / "final"), **info, **targets.facts, **metrics}
    if rank == 0:
        if args.save_asymmetric:  # the same query encoder, so the same training-text record beside it
            students.save_asymmetric(student, teacher, run_dir / "asymmetric", run_dir / "final")
        if args.push_to_hub:
            trainer.push_folder(
                run_dir / "final", f"{args.hub_model_id}-{run_dir.name}" if multi else args.hub_model_id
            )
        # last: metrics.json with the recipe marks the run finished (--skip_finished reads it)
        run_files.write_json(run_dir / "metrics.json", {**metrics, "config": run["config"]})
    return metrics


if __name__ == "__main__":
    cli.cli(main)
