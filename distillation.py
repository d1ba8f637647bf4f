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
    vector_teacher,
)
from qdistill.cli import UsageError

logger = logging.getLogger("qdistill.distillation")
PROJECTION_FIT_TEXTS = 8192  # training texts the least-squares start of a projection is fitted on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    recipes.add_flags(p)
    args = p.parse_args(argv)
    recipes.resolve(args, args.student_model_init)
    recipes.validate(p, args)
    return args


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
    vector_teacher: vector_teacher.VectorTeacher | None  # the teacher known only by those vectors (no model)


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
    sources, train, dev, triples, score_corpus = training_text.read_sources(
        cli.settings_from(training_text.TextSettings, args)
    )
    index = given_index.open_index(args.doc_index, args.doc_ids) if args.doc_index else None
    if index is not None:  # its documents train the student: collections evaluated on this index are in-domain
        given_index.require_vectors(index)  # score terms read every stored vector: refused before any labelling
        sources["corpora"].append(
            {
                "spec": cli.redact(str(args.doc_index)),
                "index_digest": index.digest(),
                "index_id_set": index.id_set_digest(),
                "role": "documents labelled by the index" if args.teacher_symmetric else "score index",
            }
        )
    logged = None
    if args.teacher_query_embeddings:
        files = [Path(f["path"]) for f in sources["query_files"]]
        if args.teacher_query_ids and args.dev_queries:  # the log may hold the validation queries too
            files.append(Path(args.dev_queries))
        logged = query_log.QueryLog(args.teacher_query_embeddings, args.teacher_query_ids, files)
    vectors = check_vectors_only(args, logged, index, train, dev, score_corpus) if args.vectors_only else None
    # a vectors-only teacher is its logged vectors: their file stands for the model in every fingerprint
    teacher_path = logged.path if vectors else encoders.resolve_model_path(args.teacher_model, args.data_dir)
    for name in args.student_model_init_list:
        encoders.resolve_model_path(name, args.data_dir)
    total = None if vectors else students.config_depth(teacher_path)  # the default run name holds the layer ids
    keep = (
        sorted(args.layers)
        if args.layers
        else total and students.choose_layers(total, args.num_layers, args.layer_strategy)
    )
    teacher_name = vectors.name if vectors else args.teacher_model
    names = runs.run_names(args.student_model_init, args.student_model_init_list, args.run_name, teacher_name, keep)
    plans = runs.plan_runs(
        names,
        args.output_path,
        args.overwrite_output_dir,
        args.resume_from_checkpoint,
        lambda init: recipes.fingerprint(args, sources, teacher_path, init, trainer.batches_per_step(device, world)),
        args.skip_finished,
    )
    return Inputs(sources, train, dev, triples, score_corpus, teacher_path, plans, index, logged, vectors)


def check_vectors_only(args, logged, index, train, dev, score_corpus) -> vector_teacher.VectorTeacher:
    """A teacher known only by its vectors, checked before any model loads: every logged row finite, its score
    function (declared, or cosine from unit norms), the truncation, every training and validation text logged
    (nothing can label the rest), and a --doc_index of the same dimension, scanned and matched to its text."""
    subject = f"logged query vectors {logged.path}"
    sim = vector_teacher.scan_log(logged, args.teacher_similarity)
    vector_teacher.check_truncation(args.truncate_dim, logged.rows.dim, subject)
    for what, texts in (("training", train), ("validation", dev)):
        missing = logged.lookup(texts)[1]
        if missing:
            raise UsageError(
                f"{len(missing)} of {len(texts)} {what} queries have no row in {logged.path} (e.g. "
                f"{texts[missing[0]]!r}); a teacher known only by its vectors labels nothing else: log them, or "
                "pass --teacher_query_ids naming the rows of those queries"
            )
    if index is not None:
        if index.dim != logged.rows.dim:
            raise UsageError(
                f"--doc_index {index.path} holds {index.dim}-d vectors but {subject} are {logged.rows.dim}-d; "
                "give the index of the same teacher (a Matryoshka index: the full vectors, cut with --truncate_dim)"
            )
        index_check.check_shape(index, index.dim, sim, "the logged teacher")
        corpus = score_corpus[0] if score_corpus else None
        index.verification = index_check.verify(index, None, corpus, sim, "", args.seed, args.allow_partial_index)
    name = f"vectors-{logged.path.stem}"
    logger.info(
        "teacher known only by its vectors (%s): %d-d, %s; nothing of it is loaded", logged.path, logged.rows.dim, sim
    )
    return vector_teacher.VectorTeacher(name, logged.rows.dim, sim)


def main(argv=None) -> dict:
    """The pipeline: flags resolved into a recipe; every input checked; finished runs kept; the teacher loaded and
    the user's index and logged vectors checked against it; students built; targets labelled; each one trained."""
    args = parse_args(argv)
    cli.start_run(args.log_level, args.seed, args.output_path)
    rank, world, device = torchrun.distributed(cli.pick_device(args.device))
    with torchrun.main_first(rank):  # one download of the training queries, however many ranks
        inputs = check_inputs(args, device, world)
    kept, plans = finished_runs(inputs.plans)
    if not plans:
        return {"runs": kept}
    if inputs.vector_teacher is not None:  # checked in check_inputs; no model of the teacher exists here
        teacher = inputs.vector_teacher
    else:
        teacher, _ = encoders.load_model(args.teacher_model, device, path=inputs.teacher_path)
        check_given(args, inputs, teacher)  # the user's index and logged vectors belong to this teacher, or exit 2
    built = build_students(args, plans, teacher, device)  # first: bad layer ids fail before any labelling
    logger.info("%d training texts (%s), %d validation texts", len(inputs.train), inputs.sources, len(inputs.dev))
    targets, loss_settings, score = prepare_targets(args, inputs, teacher, world)
    config = run_config(args, argv, inputs, device, world)
    # the leak guard's input: which normalised texts trained the student (evaluation counts its queries among them)
    sources = {**inputs.sources, "text_hashes": data.text_hashes(targets.texts)}
    trained = []
    for plan, (student, info) in zip(plans, built):  # one student per plan, all trained on the same targets
        run = {**plan, "config": {**config, "student": info, "recipe": plan["recipe"]}, "info": info}
        stage = (student, teacher, targets, loss_settings, score, sources, device, rank, world)
        trained.append(run_plan(args, run, *stage, multi=len(plans) > 1))
    torchrun.barrier()  # no rank leaves before rank 0 has written everything
    return {"runs": kept + trained}


def finished_runs(plans: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the metrics of runs finished earlier by the same recipe, kept; the plans still to train)."""
    kept = []
    for plan in (p for p in plans if p["done"]):
        logger.info("%s: finished earlier by the same recipe, kept (--skip_finished)", plan["run_dir"])
        kept.append({**json.loads((plan["run_dir"] / "metrics.json").read_text()), "reused": True})
    return kept, [p for p in plans if not p["done"]]


def build_students(args, plans: list[dict], teacher, device: str) -> list:
    """(student, info) per plan, built before labelling: bad layer ids and unloadable students fail first."""
    freeze = args.freeze_embeddings and ("freeze_embeddings" in args.explicit_flags or "if_any")
    settings = {
        "layers": args.layers,
        "num_layers": args.num_layers,
        "strategy": args.layer_strategy,
        "freeze_embeddings": freeze,
        "dropout": args.student_dropout,
        "max_seq_length": args.max_seq_length,
        "data_dir": args.data_dir,
        "batch_size": args.label_batch_size,
        "dim": args.truncate_dim,
    }
    static_on = (
        args.student_model_init_list[0]
        if args.student_model_init == "static" and args.student_model_init_list
        else None
    )
    return [students.build_student(plan["init"], teacher, device, static_on=static_on, **settings) for plan in plans]


def run_config(args, argv, inputs: Inputs, device: str, world: int) -> dict:
    """config.json of each run: every flag, versions, the teacher, the training text, the user's inputs."""
    config = run_files.run_info(vars(args), device, argv, __file__)
    config.update(
        teacher_path=str(inputs.teacher_path), train_text_sources=inputs.sources, device=device, world_size=world
    )
    if inputs.vector_teacher is not None:
        teacher = inputs.vector_teacher
        config["teacher"] = {"vectors_only": True, "name": teacher.name, "dim": teacher.dim}
        config["teacher"]["similarity"] = teacher.similarity_fn_name
    if inputs.doc_index is not None:
        config["doc_index"] = {"digest": inputs.doc_index.digest(), **inputs.doc_index.verification}
    if inputs.query_log is not None:
        config["teacher_query_embeddings"] = inputs.query_log.verification
    return config


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
        index.verification = index_check.verify(
            index, encode_documents, corpus, sim, name, args.seed, args.allow_partial_index
        )
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

    sim = encoders.similarity_name(teacher)

    def label(texts):
        if inputs.query_log is None:
            emb, cached = teacher_label(texts)
            return vector_teacher.truncate(emb, args.truncate_dim, sim == "cosine"), cached
        emb, missing = inputs.query_log.lookup(texts)
        logger.info("%d of %d texts labelled by the logged vectors", len(texts) - len(missing), len(texts))
        cached = True
        if missing:  # a vectors-only teacher has none missing (check_vectors_only)
            emb[missing], cached = teacher_label([texts[i] for i in missing])
        return vector_teacher.truncate(emb, args.truncate_dim, sim == "cosine"), cached

    t0 = time.perf_counter()
    targets = trainer.teacher_targets(
        teacher, label, inputs.train, inputs.dev, inputs.triples, args.augment, args.seed
    )
    if inputs.doc_index is not None:  # the user's index: its stored vectors, nothing encoded
        docs = vector_teacher.truncate(inputs.doc_index.all_vectors(), args.truncate_dim, sim == "cosine")
        targets = targets._replace(docs=docs)
        if args.teacher_symmetric:
            targets = document_targets(targets, inputs.doc_index, inputs.score_corpus[0], docs)
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
        sim,
        args.kl_temperature,
        args.seed,
        args.margin_scale,
    )


def document_targets(targets, index, corpus: dict, docs):
    """A symmetric teacher (one encoder, no prompts): each indexed document's text, labelled by its stored vector,
    joins the training texts (nothing encoded by the teacher)."""
    import numpy as np

    rows = [r for r in index.rows_of(sorted(corpus)) if r is not None]
    texts = [teacher_outputs.doc_text(corpus[index.ids[r]]) for r in rows]
    keep = [i for i, t in enumerate(texts) if t]
    logger.info("%d documents' text labelled by the index's stored vectors (--teacher_symmetric)", len(keep))
    targets.facts["index_document_texts"] = len(keep)
    return targets._replace(
        texts=targets.texts + [texts[i] for i in keep],
        labels=np.concatenate([targets.labels, np.asarray(docs)[[rows[i] for i in keep]]]),
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
        dim = args.truncate_dim or teacher.get_embedding_dimension()
        if args.projection_init == "lstsq" and not run["resume"]:  # training starts where a linear map ends
            n = min(len(targets.texts), PROJECTION_FIT_TEXTS)
            fitted = students.fit_projection(student, targets.texts[:n], targets.labels[:n, :dim], prompt or "")
            if fitted is not None:
                logger.info("projection fitted by least squares on %d texts: mean cosine %.4f", n, fitted)
                info["projection_fit_cosine"] = round(fitted, 4)
        student = students.fold_static_projection(student)  # a static table's projection merged into the table
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
            cli.settings_from(trainer.TrainSettings, args),
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
