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

from qdistill import search, students
from qdistill.cli import UsageError

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
        align_weight=0.0,
        layers=None,
    ):
        super().__init__()
        self.token_weight, self.align_weight = token_weight, align_weight
        # student hidden state after its layer j <-> teacher hidden state entering teacher layer layers[j + 1]
        self.align_pairs = [(j, t) for j, t in enumerate(sorted(layers or [])[1:])] if align_weight else []
        depth = None if token_weight else max((t for _, t in self.align_pairs), default=0)
        # the frozen teacher's transformer (only the layers the terms read), kept out of the module tree (never
        # trained or saved)
        needed = teacher is not None and (token_weight or self.align_pairs)
        self.__dict__["teacher_hf"] = teacher_prefix(teacher, depth).eval() if needed else None
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
        states = {}  # the student's per-layer outputs, for the alignment term
        handles = self._capture(states)
        try:
            out = self.model(dict(features))
        finally:
            for h in handles:
                h.remove()
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
            if "margin_mse" in self.weights:  # the teacher's own margins: top-1 vs every other candidate (the
                # expectation of one sampled pair's loss, without its sampling noise)
                terms["margin_mse"] = F.mse_loss(s_sc[:, :1] - s_sc[:, 1:], t_sc[:, :1] - t_sc[:, 1:])
        if "margin_mse" in self.weights and pairs is not None:  # published triples: the file's margins
            pos, neg = self.docs[pairs[:, 0]], self.docs[pairs[:, 1]]
            s_n = F.normalize(s, dim=-1) if self.similarity == "cosine" else s
            margin = (s_n * pos).sum(-1) - (s_n * neg).sum(-1)
            terms["margin_mse"] = F.mse_loss(margin, margins.to(s.dtype) * self.margin_scale)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        if self.teacher_hf is None:
            return loss
        with torch.no_grad():
            t_out = self.teacher_hf(**hf_inputs(features), output_hidden_states=bool(self.align_pairs))
        mask = features["attention_mask"].unsqueeze(-1).to(s.dtype)
        if self.token_weight:  # last-layer token states, masked to real tokens
            loss = loss + self.token_weight * masked_mse(out["token_embeddings"], t_out.last_hidden_state, mask)
        if self.align_pairs:
            align = [masked_mse(states[j], t_out.hidden_states[t], mask) for j, t in self.align_pairs]
            loss = loss + self.align_weight * sum(align) / len(align)
        return loss

    def _capture(self, store):
        """Forward hooks on the student's aligned layers that keep each one's output hidden state in `store`."""
        if not self.align_pairs:
            return []
        _, _, _, blocks = students.find_layers(self.model[0].auto_model)

        def hook(i):
            return lambda _m, _in, out: store.__setitem__(i, out[0] if isinstance(out, tuple) else out)

        return [blocks[j].register_forward_hook(hook(j)) for j, _ in self.align_pairs]

    def get_config_dict(self):
        return {
            "weights": self.weights,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "negatives": self.negatives,
            "margin_scale": self.margin_scale,
            "token_weight": self.token_weight,
            "align_weight": self.align_weight,
            "align_pairs": self.align_pairs,
        }


def masked_mse(student_states, teacher_states, mask):
    """Mean squared error over the real tokens (mask 1) of (batch, tokens, width) hidden states."""
    err = (student_states - teacher_states.to(student_states.dtype)) ** 2 * mask
    return err.sum() / (mask.sum() * student_states.shape[-1])


def hf_inputs(features) -> dict:
    """The tokenizer's outputs among a sentence-transformers feature dict, for a direct HF model call."""
    return {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in features}


def teacher_prefix(teacher, depth: int | None):
    """The teacher's HF model, or a copy holding only its first `depth` layers when the terms need no more
    (hidden_states[depth] is then exact, and the layers above are not computed on every step)."""
    hf = teacher[0].auto_model
    if depth is None or depth >= students.num_teacher_layers(teacher):
        return hf
    return students.layer_reduced_student(teacher, list(range(depth)))[0].auto_model


def make_loss(student, weights, dim, token_weight=0.0, teacher=None, align_weight=0.0, layers=None, **score_settings):
    """sentence-transformers' own losses for one embedding term; QueryDistillLoss for weighted, score, token or
    intermediate-alignment terms (align_weight: `layers` are the teacher layer ids the student kept)."""
    from sentence_transformers.sentence_transformer import losses

    aligned = align_weight and len(layers or []) > 1
    if weights == {"mse": 1.0} and not token_weight and not aligned:
        return losses.MSELoss(student)
    if weights == {"cosine": 1.0} and not token_weight and not aligned:
        return losses.EmbedDistillLoss(student, distance_metric="cosine")
    return QueryDistillLoss(
        student,
        weights,
        dim,
        teacher=teacher,
        token_weight=token_weight,
        align_weight=align_weight if aligned else 0.0,
        layers=layers,
        **score_settings,
    )


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
            bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not np.isfinite(v))
            if bad:  # a NaN would win nothing and lose nothing against a floor: training stops, nothing is saved
                where = f"at step {steps}" if steps >= 0 else "before training" if epoch < 0 else f"in epoch {epoch}"
                raise UsageError(
                    f"validation {', '.join(bad)} is not finite {where}: non-finite labels, or training diverged "
                    "(lower --learning_rate); nothing is saved as final"
                )
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
