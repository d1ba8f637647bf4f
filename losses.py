"""Training objectives and the validation evaluator.

Embedding terms (mse, cosine) match the teacher's query embedding; score terms (kl, margin_mse) match the
teacher's scores over documents of a --score_corpus (EmbedDistill's score matching, Margin-MSE).
The teacher's top-k documents per query are fixed, so they are computed once, before training, and kept by the
loss as int64 arrays (ScoreTargets); each training row's label is [teacher embedding (dim) | its row index].
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import search

EMBED_TERMS, SCORE_TERMS = ("mse", "cosine"), ("kl", "margin_mse")


class ScoreTargets(NamedTuple):
    """Per training row, fixed before training: its teacher top-k document rows (column 0 = the teacher's top-1),
    and for published triples the (positive, negative) document rows and the file's margin."""

    top: np.ndarray  # int64, (rows, k); k = 0 when no term needs it
    pairs: np.ndarray | None  # int64, (rows, 2)
    margins: np.ndarray | None  # float32, (rows,)


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
        if not 0 < terms[name] < float("inf"):  # nan and inf too: they would train to a NaN model
            raise argparse.ArgumentTypeError(f"loss weight {weight!r} must be a finite number > 0")
    return terms


def kl_term(s_sc, t_sc, tau):
    """KL(teacher || student) over candidate softmaxes, scaled by tau^2 so its gradient does not vanish."""
    return (
        F.kl_div(F.log_softmax(s_sc / tau, -1), F.log_softmax(t_sc / tau, -1), log_target=True, reduction="batchmean")
        * tau**2
    )


def candidate_scores(docs, cand, s, t, cosine: bool):
    """(teacher scores, student scores) over each query's candidate documents (rows of `docs`)."""
    if cosine:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    cand_emb = docs[cand]  # (batch, candidates, dim)
    return torch.einsum("bd,bkd->bk", t, cand_emb), torch.einsum("bd,bkd->bk", s, cand_emb)


class QueryDistillLoss(nn.Module):
    """Weighted sum of embedding terms and score terms against fixed teacher document embeddings.

    Score terms score each query's teacher top-k documents (column 0 = the teacher's top-1) plus `negatives`
    random documents drawn from this loss's own generator (seeded once; nothing else touches it).
    """

    def __init__(
        self,
        model,
        weights,
        dim,
        docs=None,
        similarity="cosine",
        temperature=0.05,
        targets: ScoreTargets | None = None,
        negatives=32,
        seed=42,
        margin_scale=1.0,
        teacher=None,
        token_weight=0.0,
    ):
        super().__init__()
        # the frozen teacher's transformer, for the token term; kept out of the module tree (never trained/saved)
        self.__dict__["teacher_encoder"] = teacher[0].eval() if teacher is not None and token_weight else None
        self.token_weight = token_weight
        self.model, self.weights, self.dim, self.similarity = model, weights, dim, similarity
        self.temperature, self.negatives, self.margin_scale = temperature, negatives, margin_scale
        self.targets = None
        if targets is not None:  # int64 document rows: exact for any corpus size
            self.targets = ScoreTargets(
                torch.as_tensor(targets.top, dtype=torch.long),
                None if targets.pairs is None else torch.as_tensor(targets.pairs, dtype=torch.long),
                None if targets.margins is None else torch.as_tensor(targets.margins, dtype=torch.float32),
            )
        self.top_k = 0 if targets is None else int(targets.top.shape[1])
        self.docs = None if docs is None else torch.as_tensor(np.asarray(docs), dtype=torch.float32)
        if self.docs is not None and similarity == "cosine":
            self.docs = F.normalize(self.docs, dim=-1)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, sentence_features, labels):
        features = sentence_features[0]
        out = self.model(dict(features))
        s = out["sentence_embedding"]
        t = labels[:, : self.dim].to(s.dtype)
        top, pairs, margins = torch.zeros((len(s), 0), dtype=torch.long, device=s.device), None, None
        if self.targets is not None:  # the label's last column is the training row (exact below 2^24 rows)
            row = labels[:, self.dim].round().long().cpu()
            top = self.targets.top[row].to(s.device)
            if self.targets.pairs is not None:
                pairs, margins = self.targets.pairs[row].to(s.device), self.targets.margins[row].to(s.device)
        terms = {}
        if "mse" in self.weights:
            terms["mse"] = F.mse_loss(s, t)
        if "cosine" in self.weights:
            terms["cosine"] = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        if self.docs is not None:
            self.docs = self.docs.to(s.device)
        if "kl" in self.weights or ("margin_mse" in self.weights and pairs is None):
            rand = torch.randint(0, len(self.docs), (len(s), self.negatives), generator=self.gen).to(s.device)
            t_sc, s_sc = candidate_scores(self.docs, torch.cat([top, rand], 1), s, t, self.similarity == "cosine")
            if "kl" in self.weights:
                terms["kl"] = kl_term(s_sc, t_sc, self.temperature)
            if "margin_mse" in self.weights:  # the teacher's own margin: top-1 vs a sampled candidate
                j = torch.randint(1, t_sc.shape[1], (len(s), 1), generator=self.gen).to(s.device)
                terms["margin_mse"] = F.mse_loss(s_sc[:, :1] - s_sc.gather(1, j), t_sc[:, :1] - t_sc.gather(1, j))
        if "margin_mse" in self.weights and pairs is not None:  # published triples: the file's margins
            pos, neg = self.docs[pairs[:, 0]], self.docs[pairs[:, 1]]
            s_n = F.normalize(s, dim=-1) if self.similarity == "cosine" else s
            margin = (s_n * pos).sum(-1) - (s_n * neg).sum(-1)
            terms["margin_mse"] = F.mse_loss(margin, margins.to(s.dtype) * self.margin_scale)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        if self.teacher_encoder is not None:  # last-layer token states, masked to real tokens
            with torch.no_grad():
                t_tok = self.teacher_encoder(dict(features))["token_embeddings"]
            mask = features["attention_mask"].unsqueeze(-1).to(s.dtype)
            err = ((out["token_embeddings"] - t_tok.to(s.dtype)) ** 2 * mask).sum() / (mask.sum() * s.shape[-1])
            loss = loss + self.token_weight * err
        return loss

    def get_config_dict(self):
        return {
            "weights": self.weights,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "negatives": self.negatives,
            "margin_scale": self.margin_scale,
        }


def make_loss(student, weights, dim, token_weight=0.0, teacher=None, **score_settings):
    """sentence-transformers' own losses for one embedding term; QueryDistillLoss for weighted, score or token
    terms."""
    from sentence_transformers.sentence_transformer import losses

    if weights == {"mse": 1.0} and not token_weight:
        return losses.MSELoss(student)
    if weights == {"cosine": 1.0} and not token_weight:
        return losses.EmbedDistillLoss(student, distance_metric="cosine")
    return QueryDistillLoss(student, weights, dim, teacher=teacher, token_weight=token_weight, **score_settings)


def make_evaluator(dev_texts, dev_labels, batch_size, score=None):
    """MSEEvaluator on cached teacher labels, encoding with encode_query (the teacher's query prompt).

    Also reports the mean cosine to the teacher and, given `score` (docs, fixed candidates per dev query,
    similarity, temperature), the KL to the teacher's candidate distribution on the same held-out queries.
    """
    from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator

    if score is not None:
        docs = torch.as_tensor(np.asarray(score["docs"]), dtype=torch.float32)
        docs = F.normalize(docs, dim=-1) if score["similarity"] == "cosine" else docs
        cand = torch.as_tensor(score["candidates"], dtype=torch.long)

    class CachedMSEEvaluator(MSEEvaluator):
        last = None  # the student's dev embeddings of this evaluation: encoded once, read twice

        def embed_inputs(self, model, sentences, **kwargs):
            if model is None:  # the teacher side: already labelled
                return dev_labels
            self.last = model.encode_query(sentences, batch_size=self.batch_size, convert_to_numpy=True)
            return self.last

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            self.last = None
            metrics = super().__call__(model, output_path, epoch, steps)
            emb = self.last if self.last is not None else self.embed_inputs(model, self.target_sentences)
            extra = {f"{self.name}_cosine": float(search.cosine_rows(emb, dev_labels).mean())}
            if score is not None:
                t_sc, s_sc = candidate_scores(
                    docs, cand, torch.as_tensor(emb), torch.as_tensor(dev_labels), score["similarity"] == "cosine"
                )
                extra[f"{self.name}_negative_kl"] = -float(kl_term(s_sc, t_sc, score["temperature"]))
            metrics.update(extra)
            self.store_metrics_in_model_card_data(model, extra, epoch, steps)
            return metrics

    return CachedMSEEvaluator(dev_texts, dev_texts, teacher_model=None, batch_size=batch_size, name="dev")


def score_targets(train_emb, dev_emb, docs, top_k, negatives, similarity, temperature, seed, train_top=True):
    """(train top-k rows, evaluator score settings): the teacher's top-k documents per query are fixed, so they
    are found once here (faiss, chunked), not on every step; dev queries also get fixed random negatives.
    train_top=False (Margin-MSE on published triples: the file names the documents) skips the training queries."""
    cosine, k = similarity == "cosine", min(top_k, len(docs))
    if train_top:
        top = search.exact_top_k(train_emb, docs, k, cosine).astype(np.int64)
    else:
        top = np.zeros((len(train_emb), 0), np.int64)
    dev_rand = np.random.default_rng(seed).integers(0, len(docs), (len(dev_emb), negatives))
    dev_cand = np.concatenate([search.exact_top_k(dev_emb, docs, k, cosine), dev_rand], 1)
    return top, {"docs": docs, "candidates": dev_cand, "similarity": similarity, "temperature": temperature}
