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


STUDENT = {}  # the real distilled student every agreement here is measured on (never the teacher renamed)


@pytest.fixture(scope="module", autouse=True)
def student(minilm_student):
    STUDENT["path"] = minilm_student["final_path"]
    return STUDENT["path"]


def run(out, *args):
    argv = ["--teacher_model", MINILM, "--models", STUDENT["path"], "--output_path", str(out)]
    return evaluate_retrieval.main([*argv, "--log_level", "warning", *args])


def row(result, model=None):
    return next(r for r in result["rows"] if r["model"] == (model or STUDENT["path"]))


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
        for model in (MINILM, STUDENT["path"]):
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


# ----------------------------------------------------------------------------- every form x metric x id type

EXACT_FORMS = [
    "faiss-flat-ip",
    "faiss-flat-l2",
    "npy-float32",
    "npy-float16",
    "milvus-ip-varchar",
    "milvus-cosine-varchar",
    "milvus-l2-varchar",
    "milvus-l2-int64",
    "milvus-ip-int64",
]
APPROXIMATE_FORMS = ["faiss-hnsw", "faiss-ivf", "faiss-pq", "faiss-sq8", "milvus-ivf_flat"]


def write_form(form: str, vectors: np.ndarray, ids: list, folder) -> list[str]:
    """The teacher's unit document vectors written as a user would hold them; the --doc_index arguments."""
    import faiss

    from qdistill import milvus

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docid").write_text("\n".join(ids) + "\n")
    dim = vectors.shape[1]
    if form.startswith("npy"):
        np.save(folder / "emb.npy", vectors.astype(form.split("-")[1]))
        return ["--doc_index", str(folder / "emb.npy"), "--doc_ids", str(folder / "docid")]
    if form.startswith("milvus"):
        _, metric, key = (form.split("-") + ["varchar"])[:3]
        approximate = metric == "ivf_flat"
        how = {"metric": "IP" if approximate else metric.upper(), "int_ids": key == "int64"}
        if approximate:
            how.update(index_type="IVF_FLAT", index_params={"nlist": 16})
        milvus.write_collection(str(folder / "m.db"), "docs", vectors, ids, normalize=False, **how)
        extra = ["--milvus_search_params", '{"nprobe": 2}'] if approximate else []
        return ["--doc_index", f"milvus:{folder / 'm.db'}#docs", *extra]
    ip = faiss.METRIC_INNER_PRODUCT
    if form == "faiss-flat-l2":
        index = faiss.IndexFlatL2(dim)
    elif form == "faiss-flat-ip":
        index = faiss.IndexFlatIP(dim)
    elif form == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dim, 16, ip)
        index.hnsw.efSearch = 7  # served with 7: the @10 metrics search max(7, 11) deep, not 101
    elif form == "faiss-ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 16, ip)
        index.nprobe = 2
    elif form == "faiss-pq":
        index = faiss.IndexPQ(dim, 48, 4, ip)
    else:
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(folder / "index"))
    return ["--doc_index", str(folder)]


@pytest.fixture(scope="module")
def own_vectors(built):
    import faiss

    _, own, pyserini = built
    flat = faiss.read_index(str(pyserini / "index"))
    return own, flat.reconstruct_n(0, flat.ntotal), (pyserini / "docid").read_text().split()


@pytest.mark.parametrize("form", EXACT_FORMS + APPROXIMATE_FORMS)
def test_every_form_gives_the_cached_index_numbers_or_its_own_served_ones(small, own_vectors, form, tmp_path):
    """A real distilled student and the teacher through every form x metric x id type: exact forms give the
    numbers of the index built here (before: a Milvus L2 collection gave teacher nDCG@10 0.0012 where 0.497 is
    right); approximate ones are filed and tabled under their own label with their served settings."""
    own, vectors, ids = own_vectors
    args = write_form(form, vectors, ids, tmp_path / "form")
    result = run(tmp_path / "out", "--datasets", str(small), *args)
    given, teacher = row(result), row(result, MINILM)
    assert given["index_verified"] and given["doc_index"]["rows_scanned"] == len(ids)
    assert given["agreement"]["overlap@10"]["value"] < 1.0  # a real student, not the teacher renamed
    if form in EXACT_FORMS:
        tol = 5e-3 if form == "npy-float16" else 1e-4  # float16 storage rounds the scores
        assert given["doc_index"]["label"] == "flat"
        for model in (MINILM, STUDENT["path"]):
            for metric in ("NDCG@10", "MRR@10", "Recall@100"):
                got, want = row(result, model)["metrics"][metric], row(own, model)["metrics"][metric]
                assert got == pytest.approx(want, abs=tol), (form, model, metric)
        want = row(own)["agreement"]["overlap@10"]["value"]
        assert given["agreement"]["overlap@10"]["value"] == pytest.approx(want, abs=max(tol, 1e-6) * 10)
        return
    label = given["doc_index"]["label"]
    assert label.startswith("given-") and given["made_alike"]["index"] == label
    assert given["served"]["k@10"] == 11 and teacher["served"]["settings"] == given["doc_index"]["served"]
    folder = tmp_path / "out" / "retrieval"
    assert list(folder.rglob(f"cran-small0.{label}.json")) and not list(folder.rglob("cran-small0.json"))
    assert f"[{label}]" in result["table"] and "approximate" in result["table"]
    if form in ("faiss-hnsw", "faiss-ivf", "milvus-ivf_flat"):  # stores its vectors: recall against exact search
        assert 0 < given["approx_recall"]["@10"] <= 1
    if form == "faiss-hnsw":  # the served numbers, by hand: faiss at efSearch 7 and k = 11, then pytrec_eval
        import faiss
        import pytrec_eval
        from sentence_transformers import SentenceTransformer

        queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(small / "queries.jsonl")}
        qrels = {}
        for line in (small / "qrels" / "test.tsv").read_text().splitlines()[1:]:
            q, d, r = line.split("\t")
            qrels.setdefault(q, {})[d] = int(r)
        q_ids = sorted(q for q in queries if q in qrels)
        emb = SentenceTransformer(MINILM_LOCAL, device="cpu").encode_query([queries[q] for q in q_ids])
        index = faiss.read_index(str(tmp_path / "form" / "index"))
        scores, rows = index.search(np.ascontiguousarray(emb, np.float32), 11)
        run_ = {q: {ids[r]: float(s) for s, r in zip(sr, rr) if r >= 0} for q, sr, rr in zip(q_ids, scores, rows)}
        per = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run_)
        assert teacher["metrics"]["NDCG@10"] == pytest.approx(
            np.mean([v["ndcg_cut_10"] for v in per.values()]), abs=1e-4
        )
        assert teacher["served"]["settings"] == {"efSearch": 7}


def test_milvus_credentials_stay_out_of_every_file_and_line(small, tmp_path, capsys):
    """A uri with user:password@ (unreachable here): refused in one line that does not show the password, and
    nothing written anywhere holds it."""
    spec = "milvus:http://root:s3cr3t-pw@127.0.0.1:9#docs"
    line = refused(
        capsys,
        [
            "--teacher_model",
            MINILM,
            "--datasets",
            str(small),
            "--doc_index",
            spec,
            "--output_path",
            str(tmp_path / "o"),
        ],
    )
    assert "s3cr3t-pw" not in line and "***@127.0.0.1" in line
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or b"s3cr3t-pw" not in f.read_bytes(), f


def test_a_score_index_read_through_any_form_marks_the_collection_in_domain(small, built, log_files, tmp_path):
    """A student whose kl term trained against a collection's --doc_index (no --score_corpus) is in-domain when
    that collection is evaluated through the index built here (by the set of ids; before: zero-shot)."""
    _, _, pyserini = built
    run_ = distill(
        tmp_path / "kl", "kl", log_files / "q.tsv", "--loss", "cosine:1.0,kl:1.0", "--doc_index", str(pyserini)
    )
    argv = ["--teacher_model", MINILM, "--models", run_["final_path"], "--datasets", str(small)]
    result = evaluate_retrieval.main([*argv, "--output_path", str(tmp_path / "e"), "--log_level", "warning"])
    assert row(result, run_["final_path"])["in_domain_text"] is True


def test_the_large_index_benchmark_is_keyed_by_its_inputs_and_builds_hnsw_on_few_documents(small, built, tmp_path):
    """benchmarks.large_index on 1,000 vectors: another --datasets at the same --num_docs is another collection
    (before: the first one reused under the new names), and --modes build_hnsw under 200,000 documents builds
    (before: a traceback); the HNSW-SQ8 file is evaluated as served and filed as approximate."""
    from benchmarks import large_index

    out, _, _ = built
    fewer = tmp_path / "fewer"  # the same documents, half the queries: other inputs
    shutil.copytree(small, fewer)
    lines = (small / "queries.jsonl").read_text().splitlines()
    (fewer / "queries.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    base = ["--teacher_model", MINILM, "--model", STUDENT["path"], "--num_docs", "1000", "--num_queries", "20"]
    base += ["--index_cache", str(out), "--output_path", str(tmp_path / "bench"), "--log_level", "warning"]
    base += ["--hnsw_m", "8", "--hnsw_ef_construction", "16", "--hnsw_ef_search", "16"]
    first = large_index.main([*base, "--datasets", str(small), "--modes", "build_hnsw", "hnsw"])
    second = large_index.main([*base, "--datasets", str(fewer), "--modes", "exact"])
    folders = sorted(p.name for p in (tmp_path / "bench").glob("collection-1000-*"))
    assert len(folders) == 2 and first["collection"]["datasets"] != second["collection"]["datasets"]
    assert first["build_hnsw"]["build_seconds"] >= 0
    hnsw = first["hnsw"]["results"][STUDENT["path"]]
    assert hnsw["doc_index"]["label"] == "given-hnswsq" and 0 < hnsw["NDCG@10"] <= 1
    assert second["exact"]["results"][STUDENT["path"]]["doc_index"]["label"] == "flat"
    assert second["teacher_reencode"]["docs_per_second"] > 0
