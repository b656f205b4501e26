"""Two small text encoders raybackfill trains in seconds on a CPU: the text demo's old (v1) and new (v2) model.

Both read what :class:`~raybackfill.data.preprocessing.TextPreprocessing` prepares (padded int64 ids, 0 pads),
so they run wherever an encoder runs (embed jobs, the backfill, queries), and both end in a learned projection
trained with a classification loss:

- :class:`HashedWords` (v1): the lower-cased words hashed into ``vocab_size`` buckets (tokenizer
  ``hashed_words``), a mean bag of word vectors, a linear projection;
- :class:`CharNgrams` (v2): the UTF-8 bytes (tokenizer ``bytes``), every character n-gram of the given lengths
  hashed into ``buckets`` inside the model, a mean bag of n-gram vectors and a two-layer projection. It sees
  sub-word structure (``get_``, ``_path``, ``TCP``) the word model cannot.

Their spaces have nothing in common (different inputs, buckets, widths and dimensions): only an adapter, or
re-embedding, connects them.
"""

from __future__ import annotations

import torch
from torch import nn

# Multiplier of the polynomial n-gram hash over byte ids (1..256); odd and above 256, so distinct n-grams of
# one length differ before the modulo.
NGRAM_BASE = 257


def ngram_ids(tokens: torch.Tensor, lengths: tuple[int, ...], buckets: int) -> torch.Tensor:
    """Byte ids (n, L) (0 pads) -> hashed character n-gram ids (n, sum of windows), in 1..buckets - 1; 0 marks
    a window that reaches into the padding.

    Examples:
        >>> ids = ngram_ids(torch.tensor([[104, 105, 0]]), (2,), 100)
        >>> ids.tolist()  # "hi" hashes to (104 * 257 + 105) % 99 + 1; the window over the pad is 0
        [[5, 0]]
    """
    if buckets < 2:
        raise ValueError(f"buckets must be at least 2, got {buckets}")
    parts = []
    for n in lengths:
        if tokens.shape[1] < n:
            continue
        windows = tokens.unfold(1, n, 1)  # (rows, L - n + 1, n)
        code = torch.zeros(windows.shape[:2], dtype=torch.int64, device=tokens.device)
        for j in range(n):
            code = code * NGRAM_BASE + windows[..., j]
        hashed = code % (buckets - 1) + 1
        parts.append(torch.where((windows > 0).all(dim=-1), hashed, torch.zeros_like(hashed)))
    if not parts:
        return torch.zeros((len(tokens), 1), dtype=torch.int64, device=tokens.device)
    return torch.cat(parts, dim=1)


class _TextEncoder(nn.Module):
    """Shared head: ``embed`` gives the embedding, ``forward`` (embedding, logits) for the classification loss."""

    classifier: nn.Linear
    embedding_dim: int

    @property
    def dims(self) -> dict[str, int]:
        return {"embedding": self.embedding_dim}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(tokens)
        return features, self.classifier(features)


class HashedWords(_TextEncoder):
    """Hashed bag of words: word ids (tokenizer ``hashed_words``) -> mean word vector -> linear projection."""

    def __init__(self, *, vocab_size: int = 32_768, word_dim: int = 64, embedding_dim: int = 48, num_classes: int = 10):
        super().__init__()
        self.words = nn.EmbeddingBag(vocab_size, word_dim, mode="mean", padding_idx=0)
        self.projection = nn.Linear(word_dim, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.words(tokens.long()))


class CharNgrams(_TextEncoder):
    """Character n-grams: byte ids (tokenizer ``bytes``) -> hashed n-grams (:func:`ngram_ids`) -> mean n-gram
    vector -> two-layer projection."""

    def __init__(
        self,
        *,
        buckets: int = 65_536,
        lengths: tuple[int, ...] | list[int] = (3, 4, 5),
        gram_dim: int = 96,
        hidden_dim: int = 192,
        embedding_dim: int = 96,
        num_classes: int = 10,
    ):
        super().__init__()
        if not lengths or min(lengths) < 1:
            raise ValueError(f"n-gram lengths must be positive, got {lengths}")
        self.lengths, self.buckets = tuple(int(n) for n in lengths), buckets
        self.grams = nn.EmbeddingBag(buckets, gram_dim, mode="mean", padding_idx=0)
        self.projection = nn.Sequential(
            nn.Linear(gram_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embedding_dim)
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.grams(ngram_ids(tokens.long(), self.lengths, self.buckets)))
