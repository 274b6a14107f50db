"""Reading the NLP evaluation/calibration files and turning them into model batches.

Splits (evaluation and calibration never share a row):
  STS   evaluation: every pair of stsb_dev.tsv. Calibration: `calib` sentences drawn (seeded)
        from sst2_dev.tsv (another GLUE set) found next to the STS file; without it, the first
        ceil(calib/2) pairs of the STS file are reserved for calibration (both sentences) and
        left out of the evaluation.
  LM    the token stream of wikitext2_valid.txt: calibration uses `calib` segments of
        `calib_len` tokens from the end of the stream, evaluation the non-overlapping windows
        from the start that end before the calibration tokens begin.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

csv.field_size_limit(1 << 24)


@dataclass
class StsData:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self):
        return len(self.scores)

    def subset(self, start: int, stop: int | None = None) -> "StsData":
        return StsData(self.sentences1[start:stop], self.sentences2[start:stop], self.scores[start:stop])


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    return path


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    # GLUE files contain unbalanced quotes inside sentences: no quote processing.
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path} is empty")
    return [h.strip() for h in rows[0]], rows[1:]


def read_sts(path) -> StsData:
    """STS-B style TSV with a header naming columns sentence1, sentence2, score. Rows with
    a missing sentence or an unreadable score are skipped."""
    path = _check_file(path)
    header, rows = _read_tsv(path)
    missing = [c for c in ("sentence1", "sentence2", "score") if c not in header]
    if missing:
        raise DataError(f"{path}: no usable rows: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
    i1, i2, isc = header.index("sentence1"), header.index("sentence2"), header.index("score")
    data = StsData([], [], [])
    for r in rows:
        if len(r) <= max(i1, i2, isc) or not r[i1].strip() or not r[i2].strip():
            continue
        try:
            score = float(r[isc])
        except ValueError:
            continue
        if not math.isfinite(score):
            continue
        data.sentences1.append(r[i1].strip())
        data.sentences2.append(r[i2].strip())
        data.scores.append(score)
    if len(data) < 2:
        raise DataError(f"{path}: no usable rows (need at least 2 sentence pairs with a numeric score, found {len(data)})")
    return data


def read_sentences(path, column: str = "sentence") -> list[str]:
    """The non-empty values of one column of a TSV with a header (e.g. sst2_dev.tsv)."""
    path = _check_file(path)
    header, rows = _read_tsv(path)
    if column not in header:
        raise DataError(f"{path}: no column {column!r} (found: {', '.join(header)})")
    i = header.index(column)
    out = [r[i].strip() for r in rows if len(r) > i and r[i].strip()]
    if not out:
        raise DataError(f"{path}: no usable rows in column {column!r}")
    return out


def sts_splits(path, calib: int = 256, seed: int = 0, calib_file=None) -> tuple[StsData, list[str], str]:
    """(evaluation pairs, calibration sentences, description of the calibration source)."""
    data = read_sts(path)
    calib_file = Path(calib_file) if calib_file is not None else Path(path).with_name("sst2_dev.tsv")
    if calib_file.is_file():
        pool = read_sentences(calib_file)
        if calib > len(pool):  # not silently fewer: the metrics would record a calibration that was not asked for
            raise DataError(f"{calib_file} has {len(pool)} sentences, fewer than the {calib} calibration samples "
                            f"asked for: give --calib {len(pool)} or fewer")
        rng = random.Random(seed)
        sentences = rng.sample(pool, calib)
        return data, sentences, f"{calib_file.name}: {len(sentences)} sentences (seed {seed})"
    reserve = math.ceil(calib / 2)
    if reserve >= len(data):
        raise DataError(f"{path}: {len(data)} pairs are too few to reserve {reserve} for calibration and evaluate on the rest")
    head = data.subset(0, reserve)
    sentences = (head.sentences1 + head.sentences2)[:calib]
    return data.subset(reserve), sentences, f"first {reserve} pairs of {Path(path).name} (excluded from evaluation)"


def sentence_calib_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 256) -> list[dict]:
    """Padded batches (dicts with input_ids, attention_mask, ...) in the given order."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def length_sorted_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 256) -> list[dict]:
    """Padded batches of sentences of similar token length (sorted by length, ties in the given order).

    Reconstruction draws each step from one such batch (a group of the engine), so a step computes
    on little padding: on 256 SST-2 sentences, groups of 32 are 90 % real tokens, one batch of all
    of them 48 %."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    return sentence_calib_batches(tokenizer, [sentences[i] for i in order], batch_size, max_length)


def read_tokens(path, tokenizer) -> torch.Tensor:
    """The whole text file as one 1-D stream of token ids."""
    path = _check_file(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: no usable rows (the file holds no text)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def lm_splits(tokens: torch.Tensor, calib: int = 256, calib_len: int = 128, window: int = 1024,
              max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation tokens: a whole number of windows from the start, calibration segments
    [calib, calib_len] from the end of the stream). They never overlap."""
    n_cal = calib * calib_len
    room = (tokens.numel() - n_cal) // window
    if room < 1:
        raise DataError(f"{tokens.numel()} tokens are too few for {calib} calibration segments of {calib_len} tokens "
                        f"plus one evaluation window of {window}")
    n_eval = room if max_windows is None else min(room, max_windows)
    cal = tokens[tokens.numel() - n_cal :].reshape(calib, calib_len)
    return tokens[: n_eval * window], cal


def segment_batches(segments: torch.Tensor, batch_size: int = 8) -> list[dict]:
    return [dict(input_ids=s, attention_mask=torch.ones_like(s)) for s in segments.split(batch_size)]
