"""Implementations of the `bridge` subcommands (parsing lives in bridge.cli)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError


def inspect(path: str) -> int:
    from bridge.checkpoint import open_checkpoint
    if _is_run(Path(path)):
        return _inspect_run(Path(path))
    sources = open_checkpoint(path)
    width = max((len(s.name) for s in sources), default=10)
    print(f"{'tensor':<{width}}  {'dtype':<9} shape")
    for s in sources:
        print(f"{s.name:<{width}}  {str(s.dtype).replace('torch.', ''):<9} {tuple(s.shape)}")
    n = sum(int(np.prod(s.shape)) for s in sources)
    nbytes = sum(s.nbytes for s in sources)
    files = sorted({s.file.name for s in sources})
    print(f"\n{len(sources)} tensors, {n:,} parameters, {nbytes / 1e6:,.1f} MB in {len(files)} file(s)")
    return 0


def _inspect_run(path: Path) -> int:
    """The latest trainer checkpoint's params and buffers, read from orbax's metadata (no tensor data)."""
    import orbax.checkpoint as ocp
    from bridge.tree import flatten
    step_dir, meta = _latest_step(path)
    absl = logging.getLogger("absl")   # silences a warning that the step's metadata file lives a level up
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        tree = ocp.StandardCheckpointer().metadata(step_dir / "state")
    finally:
        absl.setLevel(level)
    tree = getattr(tree, "item_metadata", tree)
    rows = [(k, v, "param") for k, v in flatten(dict(tree["params"])).items()] + \
           [(k, v, "buffer") for k, v in flatten(dict(tree.get("buffers") or {})).items()]
    width = max((len(k) for k, *_ in rows), default=10)
    print(f"{'tensor':<{width}}  {'kind':<6} {'stored':<9} {'exports as':<10} shape")
    n = nbytes = 0
    for k, v, kind in rows:
        torch_dtype = str(meta.torch_dtypes[k]).removeprefix("torch.") if meta and k in meta.torch_dtypes else "-"
        print(f"{k:<{width}}  {kind:<6} {str(v.dtype):<9} {torch_dtype:<10} {tuple(v.shape)}")
        n += int(np.prod(v.shape)) if kind == "param" else 0
        nbytes += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    print(f"\ntrainer checkpoint {step_dir}: step {step_dir.name}, {len(rows)} tensors, {n:,} parameters, "
          f"{nbytes / 1e6:,.1f} MB (optimizer state not counted)")
    return 0


def _convert(model: str, dynamic: str | None):
    import jax
    import bridge
    from bridge.models import resolve_model
    jax.config.update("jax_default_matmul_precision", "highest")
    module, args, kwargs = resolve_model(model)
    t0 = time.perf_counter()
    jm = bridge.convert(module, args, kwargs, dynamic=dynamic)
    return module, args, kwargs, jm, time.perf_counter() - t0


def convert(model: str, out: str, dynamic: str | None) -> int:
    import bridge
    from bridge.atomic import atomic_path
    from bridge.parity import format_report, parity_report
    from bridge.checkpoint import TORCH_SUFFIXES
    target = Path(out)
    if (target.exists() and not target.is_dir()) or target.suffix in (".safetensors", ".pt2", *TORCH_SUFFIXES):
        raise BridgeError(f"--out {out}: a directory to write the weights and parity.json into, not a file "
                          "(`bridge export` writes single files)")
    module, args, kwargs, jm, seconds = _convert(model, dynamic)
    print(f"converted in {seconds:.1f}s: {jm}")
    report = parity_report(module, jm, args, kwargs)
    print(format_report(report))
    like = model if Path(model).is_dir() else None
    bridge.export(jm, out, like=like, format="hf")
    with atomic_path(Path(out) / "parity.json") as tmp:
        tmp.write_text(json.dumps({**report, "convert_s": seconds}, indent=2, default=str))
    print(f"wrote {out} (weights + parity.json)")
    return 0 if report["outputs"] and max(r["rel_err"] for r in report["outputs"].values()) <= 1e-4 else 1


def verify(model: str, rtol: float) -> int:
    from bridge.parity import format_report, parity_report
    from bridge.verify import verify as layer_check
    module, args, kwargs, jm, _ = _convert(model, None)
    report = parity_report(module, jm, args, kwargs, grads=False)
    print(format_report(report))
    worst = max((r["rel_err"] for r in report["outputs"].values()), default=0.0)
    if worst <= rtol:
        print(f"OK: every output within {rtol:g} of torch")
        return 0
    layers = layer_check(module, jm, args, kwargs, rtol=rtol)
    first = layers["first_divergence"]
    if first:
        print(f"DIVERGED first at node {first['node']} ({first['op']}) in layer '{first['layer']}' "
              f"(relative error {first['rel_err']:.3g})\n  at {first['source']}")
    return 1


def export(ckpt: str, to: str, like: str | None, max_shard_size: str, dtype: str | None = None,
           ema: bool = False) -> int:
    import jax
    import bridge
    src = Path(ckpt)
    opts = {"like": like, "max_shard_size": max_shard_size, "dtype": dtype}
    if _is_run(src):
        written = bridge.export(_trained_state(src, ema), to, **opts)
    elif ema:
        raise BridgeError(f"{src}: --ema reads a trainer run directory (its checkpoints keep the moving average)")
    else:
        from bridge.checkpoint import load_sources, open_checkpoint
        with jax.enable_x64(True):   # a checkpoint file or HF directory: 64-bit tensors keep width and values
            # by flat name: a file whose names form no tree (`w` beside `w.absmax`) converts too
            written = bridge.export(load_sources(open_checkpoint(src)), to, **opts)
    print(f"wrote {written}")
    return 0


def _is_run(path: Path) -> bool:
    """A trainer run directory or its checkpoints/ directory (numbered step folders)."""
    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir():
        return True   # a model directory (config.json) may hold a folder named "0" for other reasons
    return not (path / "config.json").exists() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def _latest_step(path: Path):
    """(latest step folder, the run's StateMeta or None) of a trainer run directory."""
    from bridge.jax_module import StateMeta
    from bridge.state import STATE_META
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise BridgeError(f"{root}: no complete trainer checkpoint found (a numbered step folder holding state/)")
    meta_file = root.parent / STATE_META
    if not meta_file.is_file():
        return root / str(steps[-1]), None
    try:
        return root / str(steps[-1]), StateMeta.from_json(meta_file.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BridgeError(f"{meta_file}: not a readable record of the model's state ({type(e).__name__}: {e}); "
                          "delete it to export the checkpoint's arrays as they are") from e


def _trained_state(path: Path, ema: bool = False):
    """Params (or their moving average) and buffers of the latest checkpoint of a trainer run directory, with the
    run's record of the model's torch names and dtypes where it kept one."""
    import orbax.checkpoint as ocp
    from bridge.state import SavedState
    from bridge.tree import flatten, nest
    step_dir, meta = _latest_step(path)
    restored = ocp.StandardCheckpointer().restore(step_dir / "state")
    if ema and not restored.get("ema"):
        raise BridgeError(f"{step_dir}: this run kept no moving average of the params (train with ema_decay)")
    params, buffers = restored["ema" if ema else "params"], restored.get("buffers") or {}
    if meta is not None:
        return SavedState(params, buffers, meta)
    return nest({**flatten(params), **flatten(buffers)})


def train(config_path: str) -> int:
    from bridge.train_config import run_from_toml
    return run_from_toml(config_path)
