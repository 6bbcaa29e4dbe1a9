"""Resolve a MODEL argument: a Hugging Face directory, a `.pt2` file (torch.export.save), or
`package.module:factory`.

A factory returns `(module, args)`, `(module, args, kwargs)` or a dict with those keys; an error raised while
building it is bad input (BridgeError naming the factory). A Hugging Face directory builds the architecture its
config.json names (AutoModel where it names none) and gets sample inputs from its tokenizer (or random token
ids); a `.pt2` program brings its own example inputs.

Example:
    >>> module, args, kwargs = resolve_model("path/to/hf_dir")
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from bridge.errors import BridgeError
from bridge.pt2 import is_program_file, load_program

SAMPLE_TEXT = ["bridge moves PyTorch models into JAX.", "The weights come back unchanged."]


def resolve_model(spec: str, *, batch: int = 2, seq: int = 16):
    path = Path(spec)
    if path.is_dir():
        return _hf_dir(path, batch, seq)
    if path.suffix == ".pt2" or (path.is_file() and is_program_file(path)):
        return _program(path)
    if ":" not in spec:
        raise BridgeError(f"{spec!r}: not a Hugging Face directory, a .pt2 file nor a 'package.module:factory'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise BridgeError(f"{spec!r}: cannot import the factory ({e})") from e
    except Exception as e:   # the user's module failed while importing: bad input, named
        raise BridgeError(f"{spec!r}: importing {mod_name} raised {type(e).__name__}: {e}") from e
    if not callable(factory):
        raise BridgeError(f"{spec!r}: {fn_name} = {factory!r:.60} is not callable; a factory is a function returning "
                          "(module, args[, kwargs])")
    try:
        out = factory()
    except BridgeError:
        raise
    except Exception as e:   # building the user's model failed: bad input (exit 2), the factory named
        raise BridgeError(f"{spec!r}: the factory raised {type(e).__name__}: {e}") from e
    if isinstance(out, torch.nn.Module):
        raise BridgeError(f"{spec!r} returned only a module; return (module, args[, kwargs]) with example inputs")
    if isinstance(out, dict):
        if not isinstance(out.get("module"), torch.nn.Module):
            raise BridgeError(f"{spec!r} returned a dict without a torch.nn.Module under 'module' "
                              f"(keys: {sorted(out)})")
        return out["module"], tuple(out.get("args", ())), dict(out.get("kwargs", {}))
    if not (isinstance(out, (tuple, list)) and 2 <= len(out) <= 3 and isinstance(out[0], torch.nn.Module)):
        raise BridgeError(f"{spec!r} returned a {type(out).__name__}; return (module, args[, kwargs]) or a dict "
                          "with 'module', 'args' and 'kwargs'")
    module, args, *rest = out
    return module, tuple(args), dict(rest[0]) if rest else {}


def _program(path: Path):
    if not path.is_file():
        raise BridgeError(f"{path}: no such file")
    ep = load_program(path)
    if ep.example_inputs is None:
        raise BridgeError(f"{path}: the program was saved without example inputs; convert it from Python with "
                          "bridge.convert(torch.export.load(path), args, kwargs)")
    args, kwargs = ep.example_inputs
    return ep, tuple(args), dict(kwargs)


def _hf_dir(path: Path, batch: int, seq: int):
    import transformers

    if not (path / "config.json").exists():
        raise BridgeError(f"{path}: no config.json; not a Hugging Face model directory")
    model = _hf_model(path).eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        kwargs = dict(tok(SAMPLE_TEXT[:batch], padding="max_length", max_length=seq, truncation=True,
                          return_tensors="pt"))
    except (OSError, ValueError):
        kwargs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq))}
    return model, (), kwargs


def _hf_model(path: Path):
    """The architecture config.json names (`architectures`, e.g. BertForSequenceClassification: its head's
    weights convert and export with the rest); AutoModel (the base model) only where it names none that this
    transformers has."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls.from_pretrained(path)
    return transformers.AutoModel.from_pretrained(path)
