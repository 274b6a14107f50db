"""Metrics for language models: STS-B Spearman and causal-LM perplexity.

STS: sentence embedding = mean of the last hidden states over non-padding tokens (the
sentence-transformers recipe of all-MiniLM-L6-v2), similarity = cosine, score = Spearman
rank correlation x 100 against the gold scores.
Perplexity: the token stream is cut into fixed, non-overlapping windows of `window`
tokens; each window is scored independently (no context carried over), every token but
the first of each window is predicted: ppl = exp(total NLL / predicted tokens).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from ..errors import DataError, UsageError


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of hidden [B, T, C] over the tokens where attention_mask [B, T] is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def model_output(out) -> torch.Tensor:
    """The main tensor of a model's output: a HF ModelOutput's first non-None field is the
    last hidden state (encoders) or the logits (causal LMs, no labels given)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def sentence_batches(tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 256):
    """Yield (indices, tokenized batch); sentences are grouped by length so that batches
    carry little padding (the result does not depend on it: padding is masked)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tokenizer([sentences[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield idx, dict(enc)


@torch.no_grad()
def encode(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 256,
           progress: bool = False) -> torch.Tensor:
    """Mean-pooled embeddings [N, C] in the order of `sentences`."""
    model.eval()
    out = [None] * len(sentences)
    n_batches = math.ceil(len(sentences) / batch_size)
    for idx, batch in tqdm(sentence_batches(tokenizer, sentences, batch_size, max_length), total=n_batches,
                           disable=not progress, desc="encode", leave=False):
        emb = mean_pool(model_output(model(**batch)), batch["attention_mask"])
        for j, e in zip(idx, emb):
            out[j] = e
    return torch.stack(out)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(ra: np.ndarray, rb: np.ndarray) -> float:
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks)."""
    return _pearson(_rank(np.asarray(a, dtype=np.float64)), _rank(np.asarray(b, dtype=np.float64)))


@torch.no_grad()
def sts_cosines(model: nn.Module, tokenizer, sentences1: list[str], sentences2: list[str], batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """cosine(mean-pooled embeddings) of each sentence pair: the model's similarity scores [N]."""
    e1 = encode(model, tokenizer, list(sentences1), batch_size, progress=progress)
    e2 = encode(model, tokenizer, list(sentences2), batch_size, progress=progress)
    return torch.nn.functional.cosine_similarity(e1, e2, dim=1).numpy()


def sts_spearman(model: nn.Module, tokenizer, sentences1: list[str], sentences2: list[str], scores,
                 batch_size: int = 64, progress: bool = False) -> float:
    """Spearman x 100 between cosine(mean-pooled embeddings) and the gold scores."""
    cos = sts_cosines(model, tokenizer, sentences1, sentences2, batch_size, progress)
    return 100.0 * spearman(cos, np.asarray(scores, dtype=np.float64))


def paired_spearman_bootstrap(a, b, gold, resamples: int = 2000, seed: int = 0) -> dict:
    """Is scorer a better than scorer b on these pairs, beyond the evaluation set's own noise?

    Spearman x 100 of a and of b against gold, and of their difference a - b over `resamples` resamplings of the
    pairs with replacement (the same pairs for both: a paired bootstrap). Why paired: two quantized models of one
    network err on mostly the same pairs, so their difference varies far less than either score does."""
    a, b, gold = (np.asarray(v, dtype=np.float64) for v in (a, b, gold))
    # 10 pairs: below that a resample can draw one pair throughout, whose ranks are constant (no correlation)
    if not (len(a) == len(b) == len(gold)) or len(gold) < 10:
        raise DataError(f"a paired comparison needs the same pairs, at least 10: got {len(a)}, {len(b)} and "
                        f"{len(gold)} scores")
    if resamples < 1:
        raise UsageError(f"resamples={resamples}: give at least 1 (2,000 for a 95 % interval)")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for k in range(resamples):
        i = rng.integers(0, len(gold), len(gold))
        gold_ranks = _rank(gold[i])  # ranked once for both scorers
        diffs[k] = 100.0 * (_pearson(_rank(a[i]), gold_ranks) - _pearson(_rank(b[i]), gold_ranks))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    # the share of resamplings in which a scores above b, a tie counting half (two equal scorers: 0.5)
    a_wins = float((diffs > 0).mean() + 0.5 * (diffs == 0).mean())
    rho_a, rho_b = spearman(a, gold), spearman(b, gold)
    return dict(a=100.0 * rho_a, b=100.0 * rho_b, difference=100.0 * (rho_a - rho_b), low=float(lo), high=float(hi),
                a_wins=a_wins, resamples=resamples, pairs=len(gold))


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int = 1024, max_windows: int | None = None,
               progress: bool = False) -> dict:
    """Perplexity of a causal LM over fixed non-overlapping windows of `window` tokens taken
    from the start of the 1-D `token_ids` (the incomplete tail is dropped). Returns
    dict(ppl, nll, windows, window, tokens, predicted_tokens)."""
    n = token_ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"need at least {window} tokens for one window, got {token_ids.numel()}")
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(n), disable=not progress, desc="ppl", leave=False):
        ids = token_ids[i * window : (i + 1) * window].reshape(1, -1)
        logits = model_output(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False))
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll += loss.item()
        count += window - 1
    return dict(ppl=math.exp(nll / count), nll=nll / count, windows=n, window=window, tokens=n * window, predicted_tokens=count)
