"""The user's own teacher index and logged query vectors: used as they are, checked against the teacher, refused
in one line when they belong to another model, and giving the same numbers as the index built here."""

import json
import shutil

import numpy as np
import pytest
from conftest import DATA, MINILM, MINILM_LOCAL, TRAIN_TSV, make_tiny, needs_data

import evaluate_retrieval
from qdistill import cli, index_check

pytestmark = [pytest.mark.slow, needs_data]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 400-document Cranfield slice holding every document judged for its first 40 queries (BEIR layout)."""
    src, out = DATA / "cranfield", tmp_path_factory.mktemp("cran-small")
    qrels = [r.split("\t") for r in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    queries = sorted({q for q, _, _ in qrels}, key=int)[:40]
    judged = {d for q, d, _ in qrels if q in queries}
    docs = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines()]
    keep = [d for d in docs if d["_id"] in judged]
    keep += [d for d in docs if d["_id"] not in judged][: 400 - len(keep)]
    (out / "qrels").mkdir()
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep))
    lines = [json.loads(line) for line in (src / "queries.jsonl").read_text().splitlines()]
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in lines if q["_id"] in queries))
    rows = ["query-id\tcorpus-id\tscore"] + ["\t".join(r) for r in qrels if r[0] in queries]
    (out / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return out


def run(out, *args):
    argv = ["--teacher_model", MINILM, "--models", MINILM_LOCAL, "--output_path", str(out), "--log_level", "warning"]
    return evaluate_retrieval.main([*argv, *args])


def row(result, model=MINILM_LOCAL):
    return next(r for r in result["rows"] if r["model"] == model)


def refused(capsys, argv) -> str:
    """The one error line of a run that must exit 2."""
    with pytest.raises(SystemExit) as e:
        cli.cli(evaluate_retrieval.main, [*argv, "--log_level", "error"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def built(small, tmp_path_factory):
    """The toolkit's own index of the slice, evaluated, and handed back in pyserini's layout."""
    out = tmp_path_factory.mktemp("out")
    result = run(out, "--datasets", str(small), "--export_index", str(out / "export"))
    return out, result, out / "export" / "cran-small0"


def encoded_documents(monkeypatch) -> list:
    """Counts the documents the teacher encodes from here on."""
    from sentence_transformers import SentenceTransformer

    seen, real = [], SentenceTransformer.encode_document

    def counting(self, texts, *a, **k):
        seen.append(len(texts))
        return real(self, texts, *a, **k)

    monkeypatch.setattr(SentenceTransformer, "encode_document", counting)
    return seen


def test_given_index_same_numbers_nothing_encoded(small, built, tmp_path, monkeypatch):
    out, own, pyserini = built
    assert (pyserini / "index").is_file() and len((pyserini / "docid").read_text().split()) == 400
    folder = next((out / "index").glob("*/cran-small0-*"))
    npy_ids = tmp_path / "ids.txt"
    npy_ids.write_text("\n".join(json.loads((folder / "ids.json").read_text())) + "\n")
    no_text = tmp_path / "no-text"  # the same queries and qrels, no corpus.jsonl
    shutil.copytree(small, no_text, ignore=shutil.ignore_patterns("corpus.jsonl"))
    seen = encoded_documents(monkeypatch)
    given = {
        "pyserini": run(tmp_path / "a", "--datasets", str(small), "--doc_index", str(pyserini)),
        "npy": run(
            tmp_path / "b",
            "--datasets",
            str(small),
            "--doc_index",
            str(folder / "embeddings.npy"),
            "--doc_ids",
            str(folder / "ids.json"),
        ),
        "npy-txt-ids": run(
            tmp_path / "c",
            "--datasets",
            str(small),
            "--doc_index",
            str(folder / "embeddings.npy"),
            "--doc_ids",
            str(npy_ids),
        ),
    }
    assert seen == [index_check.SAMPLE] * 3  # the check's sample, nothing else
    unchecked = run(tmp_path / "d", "--datasets", str(no_text), "--doc_index", str(pyserini))
    assert seen == [index_check.SAMPLE] * 3  # no text: nothing to check, nothing encoded
    for name, result in given.items():
        for model in (MINILM, MINILM_LOCAL):
            assert row(result, model)["metrics"] == row(own, model)["metrics"], name
        assert row(result)["agreement"] == row(own)["agreement"], name
        assert row(result)["index_verified"] and row(result)["doc_index"]["median_cosine"] > 0.999
        assert row(result)["timings"]["documents_encoded"] == 0
    assert row(unchecked)["metrics"] == row(own)["metrics"] and row(unchecked)["index_verified"] is False
    # the index is keyed by content: the pyserini copy moved elsewhere gives the same result key
    moved = tmp_path / "moved"
    shutil.copytree(pyserini, moved)
    again = run(tmp_path / "a", "--datasets", str(small), "--doc_index", str(moved))
    assert row(again)["reused"] and row(again)["result_key"] == row(given["pyserini"])["result_key"]


def test_faiss_files_searched_as_built(small, built, tmp_path):
    import faiss

    out, own, pyserini = built
    flat = faiss.read_index(str(pyserini / "index"))
    vectors = flat.reconstruct_n(0, flat.ntotal)
    hnsw = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 7  # searched as built: this setting travels in the file and is kept
    hnsw.add(vectors)
    sq = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, 16, faiss.METRIC_INNER_PRODUCT)
    sq.train(vectors)
    sq.add(vectors)
    ids = pyserini / "docid"
    results = {}
    l2 = faiss.IndexFlatL2(vectors.shape[1])  # L2 over a cosine teacher's unit vectors ranks as cosine
    l2.add(vectors)
    for name, index in (("hnsw", hnsw), ("sq8", sq), ("l2", l2)):
        faiss.write_index(index, str(tmp_path / name))
        results[name] = row(
            run(
                tmp_path / f"o-{name}",
                "--datasets",
                str(small),
                "--doc_index",
                str(tmp_path / name),
                "--doc_ids",
                str(ids),
            )
        )
    assert results["hnsw"]["doc_index"]["faiss_type"] == "IndexHNSWFlat"
    assert results["hnsw"]["doc_index"]["method"].startswith("cosine")  # HNSW-flat stores the vectors
    # codes, not vectors: the stored codes against the index's own coding of the re-encoded documents
    assert results["sq8"]["doc_index"]["method"].startswith("cosine of stored to re-encoded codes")
    assert results["sq8"]["doc_index"]["median_cosine"] > 0.999
    assert results["l2"]["metrics"]["NDCG@10"] == pytest.approx(row(own)["metrics"]["NDCG@10"], abs=1e-6)
    exact = row(own)["metrics"]["NDCG@10"]
    assert abs(results["sq8"]["metrics"]["NDCG@10"] - exact) < 0.05
    # efSearch 7 is kept: recall@100 of that HNSW is well below the exact index's
    assert results["hnsw"]["metrics"]["Recall@100"] < row(own)["metrics"]["Recall@100"]


def test_bad_indexes_one_line_each(small, built, tmp_path, capsys):
    import faiss

    out, _, pyserini = built
    folder = next((out / "index").glob("*/cran-small0-*"))
    emb = np.load(folder / "embeddings.npy")
    ids = json.loads((folder / "ids.json").read_text())
    base = ["--teacher_model", MINILM, "--models", MINILM_LOCAL, "--datasets", str(small)]
    bad = tmp_path / "bad"
    bad.mkdir()

    def case(name, vectors, id_list=ids, raw_ids=None):
        path = bad / f"{name}.npy"
        np.save(path, vectors)
        id_file = bad / f"{name}.txt"
        id_file.write_bytes(raw_ids if raw_ids is not None else "\n".join(id_list).encode() + b"\n")
        return refused(
            capsys, [*base, "--output_path", str(bad / name), "--doc_index", str(path), "--doc_ids", str(id_file)]
        )

    perm = np.random.default_rng(0).permutation(len(ids))
    assert "does not match teacher" in case("shuffled", emb, [ids[i] for i in perm])
    assert "16-d vectors" in case("dim", np.random.default_rng(0).random((len(ids), 16), np.float32))
    other = make_tiny(tmp_path / "other", "bert", hidden=384, layers=1)  # another 384-d model's index
    from sentence_transformers import SentenceTransformer

    texts = [json.loads(line) for line in (small / "corpus.jsonl").read_text().splitlines()]
    by_id = {d["_id"]: (d.get("title", "") + " " + d["text"]).strip() for d in texts}
    other_emb = SentenceTransformer(other).encode([by_id[i] for i in ids], batch_size=64)
    assert "median cosine" in case("teacher", other_emb)
    judged = [line.split("\t")[1] for line in (small / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    keep = [i for i, d in enumerate(ids) if d != judged[0]]
    assert "lacks 1 of the" in case("qrels", emb[keep], [ids[i] for i in keep])
    assert "holds 400 vectors but its id file lists 399" in case("count", emb, ids[:-1])
    assert "not UTF-8" in case("utf8", emb, raw_ids=b"\xff\xfe\n" * len(ids))
    truncated = bad / "truncated.npy"
    truncated.write_bytes((bad / "dim.npy").read_bytes()[:-100])
    line = refused(
        capsys,
        [*base, "--output_path", str(bad / "t"), "--doc_index", str(truncated), "--doc_ids", str(bad / "dim.txt")],
    )
    assert "truncated" in line
    broken = bad / "index"
    broken.write_bytes((pyserini / "index").read_bytes()[:5000])
    line = refused(
        capsys,
        [*base, "--output_path", str(bad / "f"), "--doc_index", str(broken), "--doc_ids", str(pyserini / "docid")],
    )
    assert "cannot be read" in line
    raw = emb * 3.0  # unit vectors are what a cosine teacher's faiss index must hold, searched as built
    scaled = faiss.IndexFlatIP(emb.shape[1])
    scaled.add(raw)
    faiss.write_index(scaled, str(bad / "scaled"))
    ids_file = str(pyserini / "docid")
    argv = [*base, "--output_path", str(bad / "s"), "--doc_index", str(bad / "scaled"), "--doc_ids", ids_file]
    assert "400 of 400 vectors are not unit length" in refused(capsys, argv)
    # nothing half-written anywhere, and no result for a refused index
    assert not list(bad.rglob("*.json")) and not list(bad.rglob("*.tmp"))


def test_prompt_missing_from_index_refused(small, built, tmp_path, capsys):
    """The right model with a document prompt its index was built without: refused before any student loads."""
    from sentence_transformers import SentenceTransformer

    _, _, pyserini = built
    prompted = tmp_path / "prompted"
    model = SentenceTransformer(MINILM_LOCAL, device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    model.save(str(prompted))
    argv = ["--teacher_model", str(prompted), "--models", MINILM_LOCAL, "--datasets", str(small)]
    line = refused(capsys, [*argv, "--doc_index", str(pyserini), "--output_path", str(tmp_path / "o")])
    assert "does not match teacher" in line and "prompt" in line


@pytest.fixture(scope="module")
def log_files(tmp_path_factory):
    """600 real MS MARCO train queries and the teacher's own query vectors for them, as a user would log them."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path_factory.mktemp("log")
    lines = TRAIN_TSV.read_text().splitlines()[:600]
    (out / "q.tsv").write_text("\n".join(lines) + "\n")
    teacher = SentenceTransformer(MINILM_LOCAL, device="cpu")
    texts = [" ".join(line.split("\t")[1].split()) for line in lines]
    np.save(out / "vectors.npy", teacher.encode_query(texts, batch_size=64).astype(np.float16))
    return out


def distill(out, name, queries, *extra):
    flags = ["--num_layers", "2", "--num_train_epochs", "1", "--eval_steps", "5", "--learning_rate", "1e-3"]
    import distillation

    argv = ["--teacher_model", MINILM, "--train_queries", str(queries), "--num_dev_queries", "60"]
    argv += ["--output_path", str(out), "--run_name", name, "--log_level", "warning", *flags, *extra]
    return distillation.main(argv)["runs"][0]


def student_outputs(run, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(run["final_path"], device="cpu").encode(texts)


def test_logged_query_vectors_train_the_same_student(log_files, tmp_path, monkeypatch, capsys):
    from sentence_transformers import SentenceTransformer

    calls, real = [], SentenceTransformer.encode_query

    def counting(self, texts, *a, **k):
        calls.append(len(texts))
        return real(self, texts, *a, **k)

    made = distill(tmp_path / "teacher-labels", "r", log_files / "q.tsv")
    monkeypatch.setattr(SentenceTransformer, "encode_query", counting)
    logged = distill(
        tmp_path / "logged", "r", log_files / "q.tsv", "--teacher_query_embeddings", str(log_files / "vectors.npy")
    )
    assert calls[0] == index_check.SAMPLE  # the teacher's only pass: the check's sample (the rest: the student's)
    assert made["teacher_label_runs"] == 2 and logged["teacher_label_runs"] == 0  # every label from the log
    config = json.loads((tmp_path / "logged" / "r" / "metrics.json").read_text())["config"]
    assert config["teacher_query_embeddings"]["median_cosine"] > 0.999
    probe = ["what is the capital of france", "symptoms of flu in adults"]
    # the log is fp16 (as logs often are): the same student up to that rounding
    np.testing.assert_allclose(student_outputs(logged, probe), student_outputs(made, probe), atol=2e-2)
    assert abs(logged["dev_cosine"] - made["dev_cosine"]) < 2e-3
    # a log in another row order is refused before any training
    shuffled = tmp_path / "shuffled.npy"
    np.save(shuffled, np.load(log_files / "vectors.npy")[::-1])
    import distillation

    argv = [
        "--teacher_model",
        MINILM,
        "--train_queries",
        str(log_files / "q.tsv"),
        "--output_path",
        str(tmp_path / "s"),
    ]
    with pytest.raises(SystemExit) as e:
        cli.cli(distillation.main, [*argv, "--teacher_query_embeddings", str(shuffled), "--log_level", "error"])
    assert e.value.code == 2
    assert "do not match teacher" in capsys.readouterr().err and not (tmp_path / "s" / "labels").exists()


def test_score_terms_against_given_index(small, built, log_files, tmp_path, monkeypatch):
    _, _, pyserini = built
    seen = encoded_documents(monkeypatch)
    run = distill(
        tmp_path / "kl",
        "kl",
        log_files / "q.tsv",
        "--loss",
        "cosine:1.0,kl:1.0",
        "--doc_index",
        str(pyserini),
        "--score_corpus",
        str(small),
    )
    # the check's sample, then only the saved student's model-card examples: no teacher index is built
    assert seen[0] == index_check.SAMPLE and sum(seen[1:]) < 10 and not (tmp_path / "kl" / "index").exists()
    assert run["dev_kl"] < run["initial_dev_kl"]
    record = json.loads((tmp_path / "kl" / "kl" / "final" / "training_text.json").read_text())
    assert any(c.get("role") == "score index" for c in record["corpora"])
    # its documents trained the student: evaluated against that index (no corpus text needed), it is in-domain
    no_text = tmp_path / "no-text"
    shutil.copytree(small, no_text, ignore=shutil.ignore_patterns("corpus.jsonl"))
    argv = ["--teacher_model", MINILM, "--models", run["final_path"], "--datasets", str(no_text)]
    result = evaluate_retrieval.main([*argv, "--doc_index", str(pyserini), "--output_path", str(tmp_path / "e")])
    assert row(result, run["final_path"])["in_domain_text"] is True


def test_milvus_collection_searched_where_it_lives(small, built, tmp_path, capsys):
    """The real Milvus engine embedded (Milvus Lite, through pymilvus as a cluster is reached): labelled and
    label-free evaluation by search requests to the collection, checked like any index."""
    import faiss

    from qdistill import milvus

    _, own, pyserini = built
    flat = faiss.read_index(str(pyserini / "index"))
    ids = (pyserini / "docid").read_text().split()
    db = str(tmp_path / "milvus.db")
    milvus.write_collection(db, "cran", flat.reconstruct_n(0, flat.ntotal), ids, normalize=False)
    given = row(run(tmp_path / "o", "--datasets", str(small), "--doc_index", f"milvus:{db}#cran"))
    assert given["doc_index"]["kind"] == "milvus" and given["index_verified"]
    assert given["doc_index"]["median_cosine"] > 0.999 and given["doc_index"]["num_docs"] == 400
    for metric in ("NDCG@10", "Recall@100", "MRR@10"):
        assert given["metrics"][metric] == pytest.approx(row(own)["metrics"][metric], abs=1e-4)
    assert given["agreement"]["overlap@10"]["value"] == pytest.approx(row(own)["agreement"]["overlap@10"]["value"])
    free = row(run(tmp_path / "o", "--datasets", str(small), "--label_free", "--doc_index", f"milvus:{db}#cran"))
    assert free["agreement"]["overlap@10"]["value"] == pytest.approx(1.0) and "metrics" not in free
    argv = ["--teacher_model", MINILM, "--models", MINILM_LOCAL, "--datasets", str(small)]
    line = refused(capsys, [*argv, "--doc_index", f"milvus:{db}#nope", "--output_path", str(tmp_path / "x")])
    assert "no collection 'nope'" in line
