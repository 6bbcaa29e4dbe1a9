"""`bridge train CONFIG.toml`: model, data, optimizer, mesh, steps and checkpoints in one file.

    [model]                      # one of: hf_dir = "...", or hf_config = { model_type = "gpt2", ... }
    hf_config = { model_type = "gpt2", n_layer = 2, n_embd = 64, n_head = 4, vocab_size = 256 }
    auto_class = "AutoModelForCausalLM"
    [data]                       # causal-LM text: tokenizer of hf_dir, else bytes (vocab 256)
    text = "tests/data/corpus.txt"
    seq_len = 64
    batch_size = 16
    [optimizer]                  # trainers.adamw arguments
    lr = 3e-3
    warmup_steps = 3
    [train]                      # trainers.TrainConfig fields
    steps = 30
    mesh = { fsdp = 8 }
    run_dir = "runs/demo"
    [export]                     # optional
    to = "runs/demo/hf"
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError


def _model(cfg: dict):
    import torch
    import transformers
    auto = getattr(transformers, cfg.get("auto_class", "AutoModelForCausalLM"))
    torch.manual_seed(cfg.get("seed", 0))
    if "hf_dir" in cfg:
        return auto.from_pretrained(cfg["hf_dir"]), cfg["hf_dir"]
    if "hf_config" in cfg:
        c = dict(cfg["hf_config"])
        config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
        return auto.from_config(config), None
    raise BridgeError("[model] needs hf_dir or hf_config")


def _tokens(cfg: dict, hf_dir) -> np.ndarray:
    text = Path(cfg["text"]).read_text()
    if hf_dir is not None and cfg.get("tokenizer", True):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        return np.asarray(tok(text)["input_ids"], np.int32)
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def lm_batches(tokens: np.ndarray, seq_len: int, batch_size: int, steps: int, seed: int = 0):
    """Deterministic random windows of the token stream, {'input_ids', 'labels'} per step."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - seq_len, batch_size)
        ids = np.stack([tokens[s:s + seq_len] for s in starts])
        yield {"input_ids": ids, "labels": ids}


def run_from_toml(path: str) -> int:
    import bridge
    from trainers import TrainConfig, Trainer, adamw, initialize_distributed

    try:
        cfg = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BridgeError(f"{path}: cannot read the TOML config ({e})") from e
    train = TrainConfig.from_dict(cfg.get("train", {}))
    initialize_distributed(train)
    model, hf_dir = _model(cfg.get("model", {}))
    data = cfg.get("data", {})
    seq, bs = int(data.get("seq_len", 64)), int(data.get("batch_size", 8))
    tokens = _tokens(data, hf_dir)
    example = next(lm_batches(tokens, seq, bs, 1))
    import torch
    ex = {k: torch.from_numpy(v.astype(np.int64)) for k, v in example.items()}
    jm = bridge.convert(model, kwargs=ex, train=True, dynamic="batch+seq")
    opt = dict(cfg.get("optimizer", {}))
    optimizer = adamw(opt.pop("lr", 3e-4), total_steps=train.steps, **opt)
    trainer = Trainer(jm, optimizer, config=train)
    state = trainer.fit(lm_batches(tokens, seq, bs, train.steps, seed=train.seed))
    if "export" in cfg:
        out = bridge.export(trainer.export_model(state), cfg["export"]["to"], like=hf_dir or model)
        print(f"exported to {out}")
    trainer.close()
    return 0
