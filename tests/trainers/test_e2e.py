"""End to end: Hugging Face GPT-2 → bridge.convert → 30 FSDP steps on 8 simulated devices → bridge.export →
transformers.from_pretrained, whose logits must equal the JAX model's (same trained weights) within 1e-5.

Byte-level tokens (vocab 256) over tests/data/corpus.txt, so nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import bridge
import trainers
from bridge.tree import flatten
from tests.conftest import assert_close, full_only
from trainers import TrainConfig, Trainer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
STEPS, BATCH, SEQ, DEVICES = 30, 16, 64, 8


def _corpus() -> np.ndarray:
    return np.frombuffer(CORPUS.read_bytes(), dtype=np.uint8).astype(np.int64)


def _batches(data: np.ndarray, n: int, seed: int):
    """n batches of BATCH random SEQ-byte windows, deterministic in `seed` (labels = inputs: the model shifts)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        starts = rng.integers(0, len(data) - SEQ, size=BATCH)
        ids = np.stack([data[s:s + SEQ] for s in starts])
        yield {"input_ids": ids, "labels": ids}


def _gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 8 (simulated) devices")
@full_only   # make test runs the same flow through examples/hf_causal_lm_fsdp.py (tests/examples)
def test_gpt2_convert_train_fsdp_export_reload(tmp_path):
    data = _corpus()
    assert 10_000 <= data.size <= 20_000 and data.max() < 128  # plain ASCII prose

    model = _gpt2()
    ids = torch.from_numpy(next(_batches(data, 1, seed=123))["input_ids"][:2])
    jm = bridge.convert(model, kwargs={"input_ids": ids, "labels": ids}, dynamic="batch+seq", train=True)
    assert jm.needs_rng  # dropout is live in the training program

    run_dir = tmp_path / "run"
    trainer = Trainer(jm, trainers.adamw(3e-3, total_steps=STEPS, warmup_steps=3),
                      config=TrainConfig(steps=STEPS, mesh={"fsdp": DEVICES}, run_dir=str(run_dir), progress=False))
    try:
        state = trainer.fit(_batches(data, STEPS, seed=0))
    finally:
        trainer.close()
    assert int(state.step) == STEPS

    # -- the loss falls clearly, every step is logged, the curve is drawn ----------------------
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and not r["skipped"] for r in rows)
    losses = np.array([r["loss"] for r in rows])
    first, last5 = losses[0], losses[-5:].mean()
    assert abs(first - np.log(256)) < 0.5, first              # starts near uniform over 256 bytes
    assert last5 < 0.7 * first, (first, last5, losses.round(3).tolist())
    assert (run_dir / "loss.png").stat().st_size > 0

    # -- FSDP: every matrix split over the 8 devices, only biases / norm scales replicated ------
    for name, leaf in flatten(state.params).items():
        sh = leaf.sharding
        assert len(sh.device_set) == DEVICES, name
        if leaf.ndim >= 2:
            assert "fsdp" in jax.tree.leaves(tuple(sh.spec)), (name, sh.spec)
            shard = sh.shard_shape(leaf.shape)
            assert int(np.prod(shard)) * DEVICES == leaf.size, (name, leaf.shape, shard)
        else:
            assert sh.is_fully_replicated, name
    report = trainer.report
    assert report["replicated_share"] < 0.05, report
    assert report["replicated"] and all(flatten(jm.params)[k].ndim == 1 for k in report["replicated"]), report

    # -- export → transformers.from_pretrained ---------------------------------------------
    jm_trained = trainer.export_model(state)
    out = bridge.export(jm_trained, tmp_path / "hf", like=model)
    exported = safetensors.numpy.load_file(out / "model.safetensors")
    trained = {k: np.asarray(v) for k, v in flatten(state.params).items()}
    for k in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.bias"):
        assert exported[k].dtype == trained[k].dtype and np.array_equal(exported[k], trained[k]), k
    start = flatten(jm.params)["transformer.h.0.attn.c_attn.weight"]
    assert not np.array_equal(trained["transformer.h.0.attn.c_attn.weight"], np.asarray(start))  # it trained

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    for k, v in reloaded.state_dict().items():  # lm_head.weight comes back tied to wte
        want = trained.get(k, trained["transformer.wte.weight"] if k == "lm_head.weight" else None)
        assert want is not None and np.array_equal(v.numpy(), want), k

    # -- logits: torch (reloaded) vs JAX eval program on the same trained params ---------------
    jm_eval = bridge.convert(model.eval(), kwargs={"input_ids": ids}, dynamic="batch+seq")
    assert not jm_eval.needs_rng
    fresh = torch.from_numpy(next(_batches(data, 1, seed=999))["input_ids"][:4, :48])  # unseen shape
    with torch.no_grad():
        ref = reloaded(input_ids=fresh).logits
    got = jm_eval.apply(state.params, input_ids=fresh)["logits"]
    assert_close(got, ref, what="reloaded torch logits vs JAX logits")
