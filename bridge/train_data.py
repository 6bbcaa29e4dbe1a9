"""Batches for `bridge train`, one kind per objective: each yields dicts of int32 numpy arrays.

    text    causal LM: random windows of a token stream, labels = input_ids (the model shifts them)
    mlm     masked LM: the same windows; 15% of the non-special tokens are chosen, of those 80% become
            the mask token, 10% a random token, 10% stay; labels are -100 everywhere else (BERT's recipe)
    pairs   sentence pairs from a TSV file (sentence <TAB> paraphrase a line): a step holds 2P sentences,
            a_1..a_P then b_1..b_P, padded to seq_len, for `trainers.pair_contrastive`

Example:
    >>> batches = make_batches({"kind": "pairs", "pairs": "pairs.tsv", "batch_size": 16}, tok, vocab, 100)
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError

AUTO_CLASS = {"text": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "pairs": "AutoModel"}
IGNORE = -100


def tokens(cfg: dict, tok) -> np.ndarray:
    """The [data] text file as one token stream: the model's tokenizer, else UTF-8 bytes (vocab 256)."""
    path = Path(cfg.get("text", ""))
    try:
        text = path.read_text()
    except OSError as e:
        raise BridgeError(f"[data] text = '{path}': cannot read it ({e})") from e
    if tok is not None:
        return np.asarray(tok(text, verbose=False)["input_ids"], np.int32)
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def lm_batches(ids: np.ndarray, seq_len: int, batch_size: int, steps: int, seed: int = 0):
    """Deterministic random windows of the token stream, {'input_ids', 'labels'} per step."""
    if len(ids) <= seq_len:
        raise BridgeError(f"[data] text has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - seq_len, batch_size)
        window = np.stack([ids[s:s + seq_len] for s in starts])
        yield {"input_ids": window, "labels": window}


def mlm_batches(windows, tok, vocab_size: int, rate: float = 0.15, seed: int = 0):
    """Mask `rate` of each window's non-special tokens as BERT does; labels only at the chosen places."""
    if tok is None or tok.mask_token_id is None:
        raise BridgeError("[data] kind = 'mlm' needs a tokenizer with a mask token: set [model] hf_dir")
    special = np.asarray(sorted(tok.all_special_ids), np.int32)
    rng = np.random.default_rng(seed + 1)
    for batch in windows:
        ids = batch["input_ids"]
        chosen = (rng.random(ids.shape) < rate) & ~np.isin(ids, special)
        roll = rng.random(ids.shape)
        masked = np.where(chosen & (roll < 0.8), tok.mask_token_id, ids)
        masked = np.where(chosen & (roll >= 0.8) & (roll < 0.9), rng.integers(0, vocab_size, ids.shape), masked)
        yield {"input_ids": masked.astype(np.int32), "labels": np.where(chosen, ids, IGNORE).astype(np.int32)}


def read_pairs(path: str | None) -> list[tuple[str, str]]:
    """(a, b) sentence pairs from a TSV file; None: the pairs shipped with bridge (the demo's)."""
    where = path or "bridge/data/sentence_pairs.tsv"
    try:
        text = Path(path).read_text() if path else \
            resources.files("bridge.data").joinpath("sentence_pairs.tsv").read_text()
    except OSError as e:
        raise BridgeError(f"[data] pairs = '{where}': cannot read it ({e})") from e
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2 or not all(c.strip() for c in cols):
            raise BridgeError(f"{where}:{n}: expected 'sentence<TAB>paraphrase', got {line[:60]!r}")
        pairs.append((cols[0], cols[1]))
    return pairs


def pair_batches(pairs, tok, seq_len: int, batch_pairs: int, steps: int, seed: int = 0):
    """2P sentences a step (a_1..a_P, b_1..b_P), P pairs drawn without replacement."""
    if tok is None:
        raise BridgeError("[data] kind = 'pairs' needs the model's tokenizer: set [model] hf_dir")
    if batch_pairs > len(pairs):
        raise BridgeError(f"[data] batch_size = {batch_pairs} pairs, but the file holds only {len(pairs)}")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(pairs), batch_pairs, replace=False)
        enc = tok([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], padding="max_length",
                  max_length=seq_len, truncation=True, return_tensors="np")
        yield {k: np.asarray(v, np.int32) for k, v in enc.items()}


def make_batches(cfg: dict, tok, vocab_size: int, steps: int, seed: int = 0):
    """The iterator of batches the [data] table asks for (`kind` = text | mlm | pairs)."""
    kind = cfg.get("kind", "text")
    seq, bs = int(cfg.get("seq_len", 64)), int(cfg.get("batch_size", 8))
    if kind == "pairs":
        return pair_batches(read_pairs(cfg.get("pairs")), tok, seq, bs, steps, seed)
    if kind not in AUTO_CLASS:
        raise BridgeError(f"[data] kind = '{kind}': expected one of {', '.join(AUTO_CLASS)}")
    windows = lm_batches(tokens(cfg, tok), seq, bs, steps, seed)
    return mlm_batches(windows, tok, vocab_size, float(cfg.get("mask_rate", 0.15)), seed) if kind == "mlm" else windows
