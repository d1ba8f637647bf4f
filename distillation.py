"""Distill a small student query encoder from a frozen dual-encoder teacher.

The teacher's document encoder and index stay as they are; the student learns to put each query where
the teacher would (MSE or cosine between student and teacher query embeddings).

    # 2-layer [0, L-1] student of all-MiniLM-L6-v2 on MS MARCO train queries
    python3 distillation.py --teacher_model sentence-transformers/all-MiniLM-L6-v2 --num_layers 2 \\
        --train_queries msmarco
    # explicit layers, offline, on a local query file
    python3 distillation.py --teacher_model sentence-transformers/all-mpnet-base-v2 --layers 0 11 \\
        --train_queries ../shared/data/queries/msmarco-train-sample.tsv --output_path output
    # other small pretrained models as students (a Dense projection is added when dimensions differ)
    python3 distillation.py --teacher_model T --student_model_init pretrained --student_model_init_list M1 M2

Several GPUs: `torchrun --nproc_per_node 4 distillation.py ...` (the trainer's DDP); teacher labelling of
large query sets across GPUs: `--label_devices cuda:0 cuda:1 ...`.
Outputs: output/<run_name>/{config.json, final/, metrics.json, checkpoints/}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
from common import UsageError

logger = logging.getLogger("qdistill.distillation")

STRATEGIES = ("top_bottom", "bottom", "top", "uniform")
EMBED_TERMS, SCORE_TERMS = ("mse", "cosine"), ("kl", "margin_mse")


def parse_loss(spec: str) -> dict[str, float]:
    """'mse' -> {'mse': 1.0}; 'mse:1.0,kl:5.0' -> {'mse': 1.0, 'kl': 5.0}."""
    terms = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in EMBED_TERMS + SCORE_TERMS:
            raise argparse.ArgumentTypeError(f"unknown loss term {name!r}; use {', '.join(EMBED_TERMS + SCORE_TERMS)}")
        try:
            terms[name] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"loss weight {weight!r} is not a number (e.g. mse:1.0,kl:5.0)") from None
    return terms


# where each architecture keeps its transformer blocks (attribute path on the HF model) and its depth field
LAYER_LAYOUTS = [("encoder.layer", "num_hidden_layers"), ("transformer.layer", "n_layers")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher_model", default=common.PAPER_TEACHER, help="HF id or local SentenceTransformer folder")
    g.add_argument("--student_model_init", default="layer_reduction",
                   choices=["layer_reduction", "pretrained", "static"],
                   help="layer_reduction (teacher's layers), pretrained (--student_model_init_list) or static "
                   "(StaticEmbedding initialised from the teacher's own per-token outputs)")  # fmt: skip
    g.add_argument("--layers", type=int, nargs="+", help="teacher layer ids to keep, e.g. 0 11")
    g.add_argument("--num_layers", type=int, default=2, help="layers to keep when --layers is not given")
    g.add_argument("--layer_strategy", default="top_bottom", choices=STRATEGIES)
    g.add_argument(
        "--student_model_init_list", nargs="+", default=[], help="HF ids/paths for --student_model_init pretrained"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_queries", nargs="+", default=["msmarco"], help="'msmarco' or files (tsv id<TAB>text, jsonl, txt)"
    )
    g.add_argument("--max_train_queries", type=int, default=None, help="seeded sample of this many training queries")
    g.add_argument(
        "--dev_queries", default=None, help="validation query file (default: held-out slice of the training data)"
    )
    g.add_argument("--num_dev_queries", type=int, default=1000, help="size of the held-out slice")
    g.add_argument("--data_dir", default=common.DATA_DIR, help="where downloads go and local copies are looked for")
    g.add_argument(
        "--max_seq_length",
        type=int,
        default=128,
        help="query max length for labels and student (padding is per batch, so it only caps long queries)",
    )
    g = p.add_argument_group("training (paper defaults)")
    g.add_argument("--loss", default="mse", type=parse_loss,
                   help="mse (paper), cosine (direction only), or weighted terms, e.g. mse:1.0,kl:5.0 "
                   "(kl and margin_mse need --score_corpus)")  # fmt: skip
    g.add_argument("--score_corpus", default=None, help="BEIR folder or collection tsv whose teacher embeddings "
                   "the kl/margin_mse terms score against (not an evaluation set you report on)")  # fmt: skip
    g.add_argument("--kl_temperature", type=float, default=0.05, help="softmax temperature of the kl term")
    g.add_argument("--kl_top_k", type=int, default=32, help="teacher top-k documents per query for kl/margin_mse")
    g.add_argument("--kl_negatives", type=int, default=32, help="random corpus documents added per query")
    g.add_argument("--freeze_embeddings", action="store_true",
                   help="keep the teacher's token embeddings fixed: tokens unseen in training stay consistent with "
                   "the rest, and each step is cheaper")  # fmt: skip
    g.add_argument("--margin_triples", default=None,
                   help="Margin-MSE triples in the published format "
                   "pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg; "
                   "query texts from --train_queries (id<TAB>text), passages from --triples_collection")  # fmt: skip
    g.add_argument("--triples_collection", default=None, help="pid<TAB>text passages for --margin_triples")
    g.add_argument(
        "--margin_scale",
        type=float,
        default=1.0,
        help="multiplies the file's margins (cross-encoder logits) into the teacher's score range",
    )
    g.add_argument(
        "--student_dropout",
        type=float,
        default=None,
        help="set the student's dropout (default: keep the teacher's); 0 fits regression targets closer",
    )
    g.add_argument("--augment", type=int, default=0, help="perturbed variants per training query (mask/drop/swap)")
    g.add_argument("--per_device_train_batch_size", type=int, default=128)
    g.add_argument("--per_device_eval_batch_size", type=int, default=128)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--warmup_steps", type=int, default=1000, help="capped at 10%% of the run's steps")
    g.add_argument("--num_train_epochs", type=float, default=1.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-6)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--eval_steps", type=int, default=500)
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument("--save_total_limit", type=int, default=2)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--fp16", action="store_true", help="GPU only")
    g.add_argument("--bf16", action="store_true", help="GPU only")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--label_batch_size", type=int, default=256)
    g.add_argument("--label_devices", nargs="+", default=None, help="several devices: multi-process teacher labelling")
    g = p.add_argument_group("output")
    g.add_argument("--output_path", default="output")
    g.add_argument("--run_name", default=None, help="default: derived from teacher and student")
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument(
        "--save_asymmetric",
        action="store_true",
        help="also save <run>/asymmetric: a Router model, encode_query = student, encode_document = teacher",
    )
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    if args.student_model_init == "pretrained" and not args.student_model_init_list:
        p.error("--student_model_init pretrained needs --student_model_init_list M1 [M2 ...]")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    if args.num_layers < 1:
        p.error("--num_layers must be >= 1")
    if any(t in args.loss for t in SCORE_TERMS) and not (args.score_corpus or args.margin_triples):
        p.error("--loss terms kl/margin_mse need --score_corpus (a BEIR folder or collection tsv)")
    if args.augment < 0:
        p.error("--augment must be >= 0")
    if args.margin_triples and not args.triples_collection:
        p.error("--margin_triples needs --triples_collection (pid<TAB>text)")
    if args.margin_triples and args.augment:
        p.error("--augment applies to plain query training, not to --margin_triples")
    return args


# ----------------------------------------------------------------------------- layer reduction


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
    """(parent, attribute, depth field, blocks) of a BERT/MPNet/RoBERTa/DistilBERT model's transformer layers."""
    for path, field in LAYER_LAYOUTS:
        obj = hf_model
        *parents, last = path.split(".")
        try:
            for name in parents:
                obj = getattr(obj, name)
            layers = getattr(obj, last)
        except AttributeError:
            continue
        return obj, last, field, layers
    raise UsageError(
        f"unsupported architecture {hf_model.__class__.__name__}: layer reduction knows BERT, MPNet, RoBERTa and "
        "DistilBERT layouts; use --student_model_init pretrained instead"
    )


def num_teacher_layers(teacher) -> int:
    return len(find_layers(teacher[0].auto_model)[3])


def layer_reduced_student(teacher, keep: list[int]):
    """A deep copy of the teacher with only the `keep` transformer layers; config updated so it reloads."""
    total = num_teacher_layers(teacher)
    if len(set(keep)) != len(keep):
        raise UsageError(f"--layers {keep} has duplicates; give each layer id once")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise UsageError(f"--layers {bad} out of range: the teacher has {total} layers (ids 0..{total - 1})")
    student = copy.deepcopy(teacher)
    hf = student[0].auto_model
    parent, attr, field, layers = find_layers(hf)
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in sorted(keep)]))
    setattr(hf.config, field, len(keep))
    if isinstance(getattr(hf.config, "layer_types", None), list):
        hf.config.layer_types = [hf.config.layer_types[i] for i in sorted(keep)]
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


def pretrained_student(name: str, teacher, device: str, models_dir: str):
    """A small pretrained model as student, with a trainable Dense projection to the teacher's dimension."""
    from sentence_transformers import models

    student, _ = common.load_model(name, device=device, models_dir=models_dir)
    s_dim, t_dim = student.get_embedding_dimension(), teacher.get_embedding_dimension()
    if s_dim != t_dim:
        logger.info("student %s is %d-d, teacher %d-d: adding a Dense projection", name, s_dim, t_dim)
        student.append(models.Dense(s_dim, t_dim, bias=True, activation_function=torch.nn.Identity()).to(device))
        if common.encoder_settings(teacher, "query")["normalize"]:
            student.append(models.Normalize())
    student.prompts = dict(teacher.prompts)  # the student answers for the teacher's query side
    student.similarity_fn_name = teacher.similarity_fn_name
    return student


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
        for start in tqdm(range(0, vocab, batch_size), desc="static student: teacher per-token outputs"):
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
    if common.encoder_settings(teacher, "query")["normalize"]:
        modules.append(models.Normalize())
    student = SentenceTransformer(modules=modules, device=device, similarity_fn_name=teacher.similarity_fn_name)
    student.prompts = dict(teacher.prompts)
    return student


def augment_queries(texts: list[str], n: int, mask_token: str, seed: int) -> list[str]:
    """n seeded perturbations per query (EmbedDistill 4.3): mask a word, drop a word, or swap two neighbours."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        for _ in range(n):
            w = list(words)
            op = rng.choice(("mask", "drop", "swap")) if len(w) > 1 else "mask"
            i = rng.randrange(len(w))
            if op == "mask":
                w[i] = mask_token
            elif op == "drop":
                del w[i]
            else:
                j = min(i + 1, len(w) - 1) if i < len(w) - 1 else i - 1
                w[i], w[j] = w[j], w[i]
            out.append(" ".join(w))
    return out


# ----------------------------------------------------------------------------- score-based distillation


class QueryDistillLoss(nn.Module):
    """Weighted sum of embedding terms (mse, cosine) and score terms (kl, margin_mse) against fixed doc embeddings.

    Score terms use the teacher's document embeddings of --score_corpus: per query, the teacher's top-k
    documents plus random ones are scored by teacher and student query embeddings (EmbedDistill's score
    matching: KL between the two softmaxes; Margin-MSE: teacher top-1 vs one sampled candidate).
    """

    def __init__(self, model, weights, docs=None, similarity="cosine", temperature=0.05, top_k=32, negatives=32,
                 seed=42):  # fmt: skip
        super().__init__()
        self.model, self.weights, self.similarity = model, weights, similarity
        self.temperature, self.top_k, self.negatives = temperature, top_k, negatives
        self.docs = None if docs is None else torch.as_tensor(np.asarray(docs), dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(seed)
        self.margin_scale = 1.0
        self.last_terms = {}

    def forward(self, sentence_features, labels):
        s = self.model(sentence_features[0])["sentence_embedding"]
        # the collator hands over one label tensor: [teacher embedding | pos row, neg row, margin] for triples
        dim = s.shape[-1]
        t, triple = labels[:, :dim].to(s.dtype), labels[:, dim:]
        terms = {}
        if "mse" in self.weights:
            terms["mse"] = F.mse_loss(s, t)
        if "cosine" in self.weights:
            terms["cosine"] = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if any(k in self.weights for k in SCORE_TERMS):
            t_sc, s_sc = candidate_scores(self, s, t)
            if "kl" in self.weights:
                terms["kl"] = kl_term(s_sc, t_sc, self.temperature)
            if "margin_mse" in self.weights and triple.shape[1] == 3:  # published triples: given margins
                pos, neg = self.docs[triple[:, 0].long()], self.docs[triple[:, 1].long()]
                s_n = F.normalize(s, dim=-1) if self.similarity == "cosine" else s
                margin_s = (s_n * pos).sum(-1) - (s_n * neg).sum(-1)
                terms["margin_mse"] = F.mse_loss(margin_s, triple[:, 2].to(s.dtype) * self.margin_scale)
            elif "margin_mse" in self.weights:  # teacher's own margin: top-1 vs a sampled candidate
                j = torch.randint(1, t_sc.shape[1], (t_sc.shape[0], 1), generator=self.gen).to(s.device)
                terms["margin_mse"] = F.mse_loss(s_sc[:, :1] - s_sc.gather(1, j), t_sc[:, :1] - t_sc.gather(1, j))
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(self.weights[k] * v for k, v in terms.items())

    def get_config_dict(self):
        return {
            "weights": self.weights,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "negatives": self.negatives,
        }


def kl_term(s_sc, t_sc, tau):
    """KL(teacher || student) over candidate softmaxes, scaled by tau^2 so its gradient does not vanish."""
    return F.kl_div(F.log_softmax(s_sc / tau, -1), F.log_softmax(t_sc / tau, -1), log_target=True,
                    reduction="batchmean") * tau**2  # fmt: skip


def candidate_scores(loss, s, t, chunk: int = 262_144):
    """(teacher scores, student scores) over each query's candidates: teacher top-k + random corpus docs.

    Column 0 is the teacher's top-1 document. The corpus is scanned in chunks so big corpora fit in memory.
    """
    docs = loss.docs.to(s.device) if loss.docs.device != s.device else loss.docs
    loss.docs = docs
    if loss.similarity == "cosine":
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    with torch.no_grad():
        k = min(loss.top_k, docs.shape[0])
        best_v, best_i = None, None
        for start in range(0, docs.shape[0], chunk):
            v, i = (t @ docs[start : start + chunk].T).topk(min(k, docs[start : start + chunk].shape[0]), dim=1)
            i = i + start
            if best_v is not None:
                v, order = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, order)
            best_v, best_i = v, i
        rand = torch.randint(0, docs.shape[0], (t.shape[0], loss.negatives), generator=loss.gen).to(s.device)
        cand = torch.cat([best_i, rand], 1)
    cand_emb = docs[cand]  # (batch, candidates, dim)
    t_sc = torch.einsum("bd,bkd->bk", t, cand_emb)
    s_sc = torch.einsum("bd,bkd->bk", s, cand_emb)
    return t_sc, s_sc


def read_triples(args, train_texts: list[str]):
    """Published Margin-MSE triples -> (query text per triple, doc texts, [pos row, neg row, margin] per triple).

    Ids resolve through the query file (--train_queries) and the collection; triples whose query is a
    validation query, or whose ids are unknown, are dropped and counted.
    """
    path = Path(args.margin_triples)
    if not path.is_file():
        raise UsageError(f"--margin_triples {path} not found")
    id2q = {}
    for f in args.train_queries:
        id2q.update(common.read_queries(f))
    allowed = {t.lower() for t in train_texts}
    collection = common.read_queries(args.triples_collection)  # same pid<TAB>text layout
    rows, queries, pids, dropped = [], [], {}, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 5:
                raise UsageError(f"{path}:{lineno}: expected pos_score<TAB>neg_score<TAB>qid<TAB>pid_pos<TAB>pid_neg")
            try:
                pos_s, neg_s = float(cols[0]), float(cols[1])
            except ValueError:
                raise UsageError(f"{path}:{lineno}: scores must be numbers") from None
            q = " ".join(id2q.get(cols[2], "").split())
            if q.lower() not in allowed or cols[3] not in collection or cols[4] not in collection:
                dropped += 1
                continue
            for p in cols[3:5]:
                pids.setdefault(p, len(pids))
            queries.append(q)
            rows.append([pids[cols[3]], pids[cols[4]], pos_s - neg_s])
    if dropped:
        logger.warning("%s: dropped %d triples (validation query or unknown id)", path.name, dropped)
    if not rows:
        raise UsageError(f"{path}: no usable triples; check that its ids match --train_queries and the collection")
    if args.max_train_queries and len(rows) > args.max_train_queries:
        keep = sorted(random.Random(args.seed).sample(range(len(rows)), args.max_train_queries))
        rows, queries = [rows[i] for i in keep], [queries[i] for i in keep]
    doc_texts = [collection[p] for p in pids]  # pids is insertion-ordered: row i = i-th pid
    return queries, doc_texts, np.asarray(rows, dtype=np.float32)


def score_corpus_embeddings(teacher, args, teacher_path):
    """The teacher's document embeddings of --score_corpus (cached like an evaluation index)."""
    corpus, file = common.load_corpus(args.score_corpus)
    if (file.parent / "qrels").is_dir():
        logger.warning(
            "!!! --score_corpus %s is an evaluation dataset: its documents shape training; do not report "
            "results on it as held-out !!!", file.parent,
        )  # fmt: skip
    emb, _, _ = common.teacher_index(teacher, args.teacher_model, teacher_path, corpus, file, args.output_path)
    return emb


# ----------------------------------------------------------------------------- queries and labels


def msmarco_train_queries(data_dir: str) -> Path:
    """MS MARCO train queries: downloads/msmarco/queries.train.tsv, downloaded once; offline, the local sample."""
    target = Path("downloads") / "msmarco" / "queries.train.tsv"
    if target.exists():
        return target
    try:
        from beir import util

        target.parent.mkdir(parents=True, exist_ok=True)
        tgz = target.parent / "queries.tar.gz"
        util.download_url(common.MSMARCO_QUERIES_URL, str(tgz))
        with tarfile.open(tgz) as tar, tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tar.extract("queries.train.tsv", tmp, filter="data")
            os.replace(Path(tmp) / "queries.train.tsv", target)
        return target
    except Exception as e:  # noqa: BLE001 - any download failure falls back to a local copy
        (target.parent / "queries.tar.gz").unlink(missing_ok=True)  # no half-downloaded archive left behind
        local = Path(data_dir) / "queries" / "msmarco-train-sample.tsv"
        if local.exists():
            logger.warning("MS MARCO download failed (%s); using the local sample %s", e.__class__.__name__, local)
            return local
        raise UsageError(
            f"MS MARCO queries download failed ({e.__class__.__name__}) and no local copy under {data_dir}/queries; "
            "pass a query file to --train_queries"
        ) from e


def load_queries(args) -> tuple[list[str], list[str], list[str]]:
    """(train texts, dev texts, source files); seeded, de-duplicated, dev disjoint from train."""
    files = [msmarco_train_queries(args.data_dir) if q == "msmarco" else Path(q) for q in args.train_queries]
    texts = common.clean_queries(t for f in files for t in common.read_queries(f).values())
    if args.dev_queries:
        dev = common.clean_queries(common.read_queries(args.dev_queries).values())
        dev_keys = {t.lower() for t in dev}
        texts = [t for t in texts if t.lower() not in dev_keys]  # never train on the validation queries
    else:
        rng = random.Random(args.seed)
        n_dev = min(args.num_dev_queries, len(texts) // 10)
        idx = list(range(len(texts)))
        rng.shuffle(idx)
        dev = [texts[i] for i in sorted(idx[:n_dev])]
        texts = [texts[i] for i in sorted(idx[n_dev:])]
    if args.max_train_queries and len(texts) > args.max_train_queries:
        texts = random.Random(args.seed + 1).sample(texts, args.max_train_queries)
    if not texts:
        raise UsageError(
            f"no training queries left in {[str(f) for f in files]} after dropping empties/duplicates/dev"
        )
    if not dev:
        raise UsageError("no validation queries; pass --dev_queries FILE or more training queries")
    return texts, dev, [str(f) for f in files]


def teacher_labels(teacher, teacher_name, teacher_path, texts, args) -> tuple[np.ndarray, bool]:
    """Teacher query embeddings (encode_query), cached in fp16 under output/labels/.

    The folder is keyed by everything that changes a label (teacher id and content fingerprint, max length,
    prompt, normalization); inside it each cached set is named by the hash of its texts (which covers the
    file content and the sample), and a new sample is served from any cached superset.
    """
    settings = {
        "teacher": teacher_name,
        "teacher_fingerprint": common.model_fingerprint(teacher_path),
        **common.encoder_settings(teacher, "query"),
    }
    folder = Path(args.output_path) / "labels" / common.slug(teacher_name)
    folder = folder / common.sha256_texts([json.dumps(settings, sort_keys=True)])[:16]
    digest = common.sha256_texts(texts)[:24]
    path = folder / f"{digest}.npy"
    if path.exists():
        logger.info("reusing cached teacher labels %s (%d queries)", path, len(texts))
        return np.load(path).astype(np.float32), True
    for other in sorted(folder.glob("*.texts.json")):
        cached = {t: i for i, t in enumerate(json.loads(other.read_text()))}
        if all(t in cached for t in texts):
            logger.info("serving %d labels from cached superset %s", len(texts), other.name)
            emb = np.load(other.with_name(other.name.replace(".texts.json", ".npy")), mmap_mode="r")
            return np.asarray(emb[[cached[t] for t in texts]], dtype=np.float32), True
    t0 = time.perf_counter()
    pool = teacher.start_multi_process_pool(args.label_devices) if args.label_devices else None
    try:
        with torch.inference_mode():
            emb = teacher.encode_query(
                texts, batch_size=args.label_batch_size, show_progress_bar=True, convert_to_numpy=True, pool=pool
            )
    finally:
        if pool is not None:
            teacher.stop_multi_process_pool(pool)
    secs = time.perf_counter() - t0
    logger.info("labelled %d queries in %.1fs (%.0f queries/s)", len(texts), secs, len(texts) / secs)
    save_labels(
        folder, digest, texts, emb, {**settings, "seconds": round(secs, 2), "queries_per_second": len(texts) / secs}
    )
    return emb.astype(np.float32), False


def save_labels(folder: Path, digest: str, texts: list[str], emb: np.ndarray, meta: dict) -> None:
    """Write texts and meta first, the .npy last and atomically: the .npy's presence means complete."""
    folder.mkdir(parents=True, exist_ok=True)
    common.write_json(folder / f"{digest}.json", {**meta, "num_texts": len(texts)})
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, emb.astype(np.float16))  # fp16 is plenty for targets of unit-norm vectors
    common.write_json(folder / f"{digest}.texts.json", texts)
    os.replace(tmp, folder / f"{digest}.npy")


# ----------------------------------------------------------------------------- training


def make_evaluator(dev_texts, dev_labels, batch_size, score_loss=None):
    """MSEEvaluator on cached teacher labels, encoding with encode_query (the teacher's query prompt).

    Also reports the mean cosine to the teacher and, with a score loss, the KL to the teacher's candidate
    distribution on the same held-out queries (fixed candidates: the generator is re-seeded each call).
    """
    from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator

    class CachedMSEEvaluator(MSEEvaluator):
        def embed_inputs(self, model, sentences, **kwargs):
            if model is None:  # the teacher side: already labelled
                return dev_labels
            return model.encode_query(sentences, batch_size=self.batch_size, convert_to_numpy=True)

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            metrics = super().__call__(model, output_path, epoch, steps)
            emb = self.embed_inputs(model, self.target_sentences)
            cos = (emb * dev_labels).sum(1) / (
                np.linalg.norm(emb, axis=1) * np.linalg.norm(dev_labels, axis=1) + 1e-12
            )
            extra = {f"{self.name}_cosine": float(cos.mean())}
            if score_loss is not None and score_loss.docs is not None:
                score_loss.gen.manual_seed(12345)
                with torch.no_grad():
                    t_sc, s_sc = candidate_scores(score_loss, torch.as_tensor(emb), torch.as_tensor(dev_labels))
                    extra[f"{self.name}_negative_kl"] = -float(kl_term(s_sc, t_sc, score_loss.temperature))
            metrics.update(extra)
            self.store_metrics_in_model_card_data(model, extra, epoch, steps)
            return metrics

    return CachedMSEEvaluator(dev_texts, dev_texts, teacher_model=None, batch_size=batch_size, name="dev")


def make_loss(student, args, docs=None, similarity="cosine"):
    """sentence-transformers' losses for one embedding term; QueryDistillLoss for weighted or score terms."""
    from sentence_transformers.sentence_transformer import losses

    if args.loss == {"mse": 1.0}:
        return losses.MSELoss(student)
    if args.loss == {"cosine": 1.0}:
        return losses.EmbedDistillLoss(student, distance_metric="cosine")
    return QueryDistillLoss(student, args.loss, docs, similarity, args.kl_temperature, args.kl_top_k,
                            args.kl_negatives, args.seed)  # fmt: skip


def train_student(student, name, run_dir, train_texts, train_labels, evaluator, loss, args, device) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    train_ds = Dataset.from_dict({"query": train_texts, "label": train_labels})
    steps_per_epoch = -(-len(train_texts) // args.per_device_train_batch_size)
    total_steps = max(1, int(steps_per_epoch * args.num_train_epochs))
    warmup = min(args.warmup_steps, total_steps // 10)
    eval_steps = min(args.eval_steps, total_steps)
    if (args.fp16 or args.bf16) and not device.startswith("cuda"):
        raise UsageError("--fp16/--bf16 need a CUDA GPU; drop them on CPU")
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=warmup,
        adam_epsilon=args.adam_epsilon,
        weight_decay=args.weight_decay,
        seed=args.seed,
        data_seed=args.seed,
        fp16=args.fp16,
        bf16=args.bf16,
        use_cpu=device == "cpu",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,  # the best validation checkpoint becomes final/
        # the best validation checkpoint: by MSE to the teacher, or by KL when no embedding term is trained
        metric_for_best_model="eval_dev_negative_mse" if set(args.loss) & set(EMBED_TERMS) else "eval_dev_negative_kl",
        greater_is_better=True,
        logging_steps=args.logging_steps,
        report_to="none",
        push_to_hub=False,
        dataloader_drop_last=False,
    )
    logger.info(
        "training %s: %d queries, %d steps (warmup %d), lr %g, loss %s",
        name,
        len(train_texts),
        total_steps,
        warmup,
        args.learning_rate,
        args.loss,
    )
    trainer = SentenceTransformerTrainer(
        model=student, args=targs, train_dataset=train_ds, loss=loss, evaluator=evaluator
    )
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = True
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    secs = time.perf_counter() - t0
    peak = {"peak_rss_mb": round(_peak_rss_mb(), 1)}
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        "train_queries": len(train_texts),
        "train_steps": out.global_step,
        "warmup_steps": warmup,
        "train_seconds": round(secs, 1),
        "train_queries_per_second": round(len(train_texts) * args.num_train_epochs / secs, 1),
        "train_loss": out.training_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "log_history": trainer.state.log_history,
        **peak,
    }


def save_asymmetric(student, teacher, path):
    """One folder, one SentenceTransformer: encode_query runs the student, encode_document the teacher."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Router

    router = Router.for_query_document(query_modules=list(student), document_modules=list(teacher))
    model = SentenceTransformer(modules=[router], device=str(teacher.device), prompts=dict(teacher.prompts),
                                similarity_fn_name=teacher.similarity_fn_name)  # fmt: skip
    with common.atomic_dir(path) as tmp:
        model.save(str(tmp))


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.start_run(args)
    train_texts, dev_texts, files = load_queries(args)  # bad query files fail before any model loads
    teacher, teacher_path = common.load_model(args.teacher_model, device=device, models_dir="downloads/models")
    doc_max_len = teacher.max_seq_length  # the document side keeps its own length
    teacher.max_seq_length = args.max_seq_length

    # students first: bad layer ids fail before any labelling
    students = []
    if args.student_model_init == "layer_reduction":
        total = num_teacher_layers(teacher)
        keep = sorted(args.layers) if args.layers else choose_layers(total, args.num_layers, args.layer_strategy)
        student = layer_reduced_student(teacher, keep)
        if args.freeze_embeddings:
            student[0].auto_model.embeddings.requires_grad_(False)
        default_name = f"{common.slug(Path(args.teacher_model).name)}-L{'-'.join(map(str, keep))}"
        students.append((default_name, student, {"layers": keep, "teacher_layers": total}))
    elif args.student_model_init == "static":
        student = static_student(teacher, device, args.label_batch_size)
        students.append((f"{common.slug(Path(args.teacher_model).name)}-static", student, {"student_init": "static"}))
    else:
        for name in args.student_model_init_list:
            student = pretrained_student(name, teacher, device, "downloads/models")
            default_name = f"{common.slug(Path(args.teacher_model).name)}-from-{common.slug(Path(name).name)}"
            students.append((default_name, student, {"student_init": name}))

    runs = []
    for default_name, student, info in students:
        if args.student_dropout is not None:
            set_dropout(student, args.student_dropout)
        run_name = args.run_name or default_name
        if args.run_name and len(students) > 1:
            run_name = f"{args.run_name}-{default_name}"
        run_dir = Path(args.output_path) / run_name
        if (
            run_dir.exists()
            and any(run_dir.iterdir())
            and not (args.overwrite_output_dir or args.resume_from_checkpoint)
        ):
            raise UsageError(f"{run_dir} exists and is not empty; pass --overwrite_output_dir or another --run_name")
        runs.append((run_dir, student, info))

    n_aug = 0
    if args.augment:  # variants are labelled by the teacher like any query, for embedding matching
        variants = augment_queries(train_texts, args.augment, teacher.tokenizer.mask_token or "[MASK]", args.seed)
        logger.info("--augment %d: %d originals + %d variants", args.augment, len(train_texts), len(variants))
        train_texts, n_aug = train_texts + variants, len(variants)
    logger.info("%d training queries, %d validation queries from %s", len(train_texts), len(dev_texts), files)
    if not args.margin_triples:  # triples label their own queries below
        train_labels, train_cached = teacher_labels(teacher, args.teacher_model, teacher_path, train_texts, args)
    dev_labels, dev_cached = teacher_labels(teacher, args.teacher_model, teacher_path, dev_texts, args)
    docs = score_corpus_embeddings(teacher, args, teacher_path) if args.score_corpus else None
    if args.margin_triples:
        queries, doc_texts, triples = read_triples(args, train_texts)
        unique = list(dict.fromkeys(queries))
        labels, train_cached = teacher_labels(teacher, args.teacher_model, teacher_path, unique, args)
        row = {q: i for i, q in enumerate(unique)}
        teacher.max_seq_length = doc_max_len
        with torch.inference_mode():  # the teacher's document side for the triples' passages
            docs = teacher.encode_document(doc_texts, batch_size=32, show_progress_bar=True, convert_to_numpy=True)
        teacher.max_seq_length = args.max_seq_length
        # label = [teacher query embedding | pos row, neg row, margin]; the loss splits it again
        train_texts = queries
        train_labels = np.concatenate([labels[[row[q] for q in queries]], triples], axis=1)
        logger.info("--margin_triples: %d triples over %d queries and %d passages", len(queries), len(unique),
                    len(doc_texts))  # fmt: skip
    sim = common.similarity_name(teacher)

    results = []
    for run_dir, student, info in runs:
        if args.overwrite_output_dir and not args.resume_from_checkpoint and run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = common.run_info(args)
        config.update(student=info, teacher_path=str(teacher_path), train_files=files, device=device)
        common.write_json(run_dir / "config.json", config)  # first, so a crashed run still says what it was

        if args.student_model_init != "static":
            student.max_seq_length = args.max_seq_length
        loss = make_loss(student, args, docs, sim)
        if hasattr(loss, "margin_scale"):
            loss.margin_scale = args.margin_scale
        evaluator = make_evaluator(
            dev_texts, dev_labels, args.per_device_eval_batch_size, loss if docs is not None else None
        )
        initial = evaluator(student)
        train = train_student(student, run_dir.name, run_dir, train_texts, train_labels, evaluator, loss, args, device)
        final = evaluator(student)
        with common.atomic_dir(run_dir / "final") as tmp:
            student.save(str(tmp), model_name=run_dir.name)
        if args.save_asymmetric:
            teacher.max_seq_length = doc_max_len
            save_asymmetric(student, teacher, run_dir / "asymmetric")
            teacher.max_seq_length = args.max_seq_length
        metrics = {
            "run_dir": str(run_dir),
            "final_path": str(run_dir / "final"),
            **info,
            "num_dev_queries": len(dev_texts),
            "initial_dev_mse": -initial["dev_negative_mse"] / 100,
            "initial_dev_cosine": initial["dev_cosine"],
            "dev_mse": -final["dev_negative_mse"] / 100,
            "dev_cosine": final["dev_cosine"],
            "labels_from_cache": {"train": train_cached, "dev": dev_cached},
            "augmented_variants": n_aug,
            **(
                {"initial_dev_kl": -initial["dev_negative_kl"], "dev_kl": -final["dev_negative_kl"]}
                if "dev_negative_kl" in final
                else {}
            ),  # fmt: skip
            **train,
        }
        common.write_json(run_dir / "metrics.json", {**metrics, "config": config})
        logger.info(
            "%s: dev MSE %.3e -> %.3e, cosine to teacher %.3f -> %.3f; saved %s",
            run_dir.name, metrics["initial_dev_mse"], metrics["dev_mse"], metrics["initial_dev_cosine"],
            metrics["dev_cosine"], run_dir / "final",
        )  # fmt: skip
        if args.push_to_hub:
            student.push_to_hub(args.hub_model_id if len(runs) == 1 else f"{args.hub_model_id}-{run_dir.name}")
        results.append(metrics)
    return {"runs": results}


if __name__ == "__main__":
    common.cli(main)
