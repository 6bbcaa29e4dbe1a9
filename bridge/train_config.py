"""`bridge train CONFIG.toml`: model, data, optimizer, mesh, steps and checkpoints in one file.

    [model]                      # one of: hf_dir = "...", or hf_config = { model_type = "gpt2", ... }
    hf_config = { model_type = "gpt2", n_layer = 2, n_embd = 64, n_head = 4, vocab_size = 256 }
    auto_class = "AutoModelForCausalLM"   # default by [data] kind (see bridge/train_data.py)
    overrides = { resid_pdrop = 0.0 }     # optional: config fields to change
    freeze = ["transformer.wte.*"]        # optional: parameters (glob patterns) not to train
    [data]
    kind = "text"                # text (causal LM) | mlm (masked LM) | pairs (sentence pairs, contrastive)
    text = "tests/data/corpus.txt"   # text/mlm: tokenizer of hf_dir, else bytes (vocab 256)
    seq_len = 64
    batch_size = 16              # sequences a step (pairs: sentence pairs a step)
    [optimizer]                  # trainers.adamw arguments
    lr = 3e-3
    warmup_steps = 3
    [train]                      # trainers.TrainConfig fields
    steps = 30
    mesh = { fsdp = 8 }
    run_dir = "runs/demo"
    [export]                     # optional
    to = "runs/demo/hf"
    ema = false                  # true: the moving average of the params ([train] ema_decay = 0.999)

Fine-tuning the sentence encoder all-MiniLM-L6-v2 on pairs (the pairs file defaults to the demo's):

    [model]
    hf_dir = "path/to/all-MiniLM-L6-v2"
    [data]
    kind = "pairs"
    pairs = "bridge/data/sentence_pairs.tsv"
    seq_len = 32
    batch_size = 16
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError
from bridge.train_data import AUTO_CLASS, make_batches


def _model(cfg: dict, kind: str):
    import torch
    import transformers
    name = cfg.get("auto_class", AUTO_CLASS.get(kind, "AutoModelForCausalLM"))
    auto = getattr(transformers, name, None)
    if auto is None:
        raise BridgeError(f"[model] auto_class = '{name}': transformers has no such class")
    torch.manual_seed(cfg.get("seed", 0))
    overrides = dict(cfg.get("overrides", {}))   # config fields to change, e.g. { hidden_dropout_prob = 0.0 }
    if "hf_dir" in cfg:
        model, hf_dir = auto.from_pretrained(cfg["hf_dir"], **overrides), cfg["hf_dir"]
    elif "hf_config" in cfg:
        c = {**cfg["hf_config"], **overrides}
        config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
        model, hf_dir = auto.from_config(config), None
    else:
        raise BridgeError("[model] needs hf_dir or hf_config")
    _freeze(model, cfg.get("freeze", []))
    return model, hf_dir


def _freeze(model, patterns) -> None:
    """requires_grad=False on the parameters matching any glob pattern (the trainer then leaves them
    as they are and keeps no optimizer state for them). A pattern matching nothing is an error."""
    import fnmatch
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise BridgeError(f"[model] freeze: {pattern!r} matches no parameter (e.g. {', '.join(names[:3])})")
        for n in hit:
            model.get_parameter(n).requires_grad_(False)


def _tokenizer(data: dict, hf_dir):
    if hf_dir is None or not data.get("tokenizer", True):
        return None
    import transformers
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


# the keys each table takes ([train]: TrainConfig's fields, checked by TrainConfig itself)
_TABLES = {
    "model": {"hf_dir": str, "hf_config": dict, "auto_class": str, "seed": int, "overrides": dict, "freeze": list},
    "data": {"kind": str, "text": str, "pairs": str, "seq_len": int, "batch_size": int, "mask_rate": float,
             "tokenizer": bool},
    "optimizer": {"lr": float, "warmup_steps": int, "weight_decay": float, "clip_norm": float,
                  "b1": float, "b2": float, "eps": float, "end_lr_ratio": float},
    "export": {"to": str, "ema": bool},
    "train": None,
}


def _check_tables(path, cfg: dict) -> None:
    """Every table and key known and of its type, before anything runs: a typo is named, not ignored."""
    for table, value in cfg.items():
        if table not in _TABLES or not isinstance(value, dict):
            raise BridgeError(f"{path}: [{table}] is not a table this config takes; known: {sorted(_TABLES)}")
        for key, v in value.items() if _TABLES[table] else ():
            want = _TABLES[table].get(key)
            if want is None:
                raise BridgeError(f"{path}: [{table}] {key}: unknown key; known: {sorted(_TABLES[table])}")
            want = (int, float) if want is float else want   # 3 for 3.0
            if isinstance(v, bool) != (want is bool) or not isinstance(v, want):
                raise BridgeError(f"{path}: [{table}] {key} = {v!r}: expected "
                                  f"{getattr(want, '__name__', 'a number')}")


def run_from_toml(path: str) -> int:
    import torch

    import bridge
    from trainers import TrainConfig, Trainer, adamw, initialize_distributed, model_loss, pair_contrastive

    try:
        cfg = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BridgeError(f"{path}: cannot read the TOML config ({e})") from e
    _check_tables(path, cfg)
    try:
        train = TrainConfig.from_dict(cfg.get("train", {}))
    except ValueError as e:
        raise BridgeError(f"{path}: [train]: {e}") from None
    if "export" in cfg:   # where the export goes is settled before training, not found wanting after it
        if "to" not in cfg["export"]:
            raise BridgeError(f"{path}: [export] needs `to`, the path to write")
        if cfg["export"].get("ema") and train.ema_decay is None:
            raise BridgeError(f"{path}: [export] ema = true needs [train] ema_decay (e.g. 0.999): without it the "
                              "run keeps no moving average of the params to export")
        try:
            Path(cfg["export"]["to"]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BridgeError(f"{path}: [export] to={cfg['export']['to']!r}: cannot create its directory ({e})") \
                from None
    initialize_distributed(train)
    data = cfg.get("data", {})
    kind = data.get("kind", "text")
    model, hf_dir = _model(cfg.get("model", {}), kind)
    tok = _tokenizer(data, hf_dir)
    vocab = int(getattr(model.config, "vocab_size", 256))
    example = next(make_batches(data, tok, vocab, 1))
    ex = {k: torch.from_numpy(v.astype(np.int64)) for k, v in example.items()}
    compute = getattr(torch, train.compute_dtype) if train.compute_dtype else None   # graph in that dtype
    jm = bridge.convert(model, kwargs=ex, train=True, dynamic="batch+seq", compute_dtype=compute)
    opt = dict(cfg.get("optimizer", {}))
    optimizer = adamw(opt.pop("lr", 3e-4), total_steps=train.steps, **opt)
    trainer = Trainer(jm, optimizer, loss_fn=pair_contrastive() if kind == "pairs" else model_loss, config=train)
    state = trainer.fit(make_batches(data, tok, vocab, train.steps, seed=train.seed))
    if "export" in cfg:
        out = bridge.export(trainer.export_model(state, ema=bool(cfg["export"].get("ema", False))),
                            cfg["export"]["to"], like=hf_dir or model)
        print(f"exported to {out}")
    trainer.close()
    return 0
