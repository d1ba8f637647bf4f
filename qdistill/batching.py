"""Length-grouped batches: short training texts of very different lengths waste most of a batch on padding.

On the example's 15k texts (11 tokens on average), random batches of 64 pad to 3.0x the real token count;
grouped by length (transformers' megabatch grouping, batch order shuffled) to 1.07x.
"""

from __future__ import annotations

import functools

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedBatchSampler(DefaultBatchSampler):
    def __init__(self, dataset, batch_size: int, drop_last: bool, lengths: list[int], **kwargs):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, **kwargs)
        self.lengths = lengths

    def __iter__(self):
        # reseeded per epoch (the trainer calls set_epoch), so a resumed run replays the same batches
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=g)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # megabatches come sorted longest first; shuffled so no epoch runs long-to-short
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]

    def __len__(self):
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)


def length_grouped(tokenizer, texts: list[str], max_length: int | None):
    """A batch_sampler for SentenceTransformerTrainingArguments (picklable, as checkpoints save the arguments)."""
    if hasattr(tokenizer, "encode_batch"):  # a static student's tokenizers.Tokenizer
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
    else:
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    lengths = [len(x) if max_length is None else min(len(x), max_length) for x in ids]
    return functools.partial(LengthGroupedBatchSampler, lengths=lengths)
