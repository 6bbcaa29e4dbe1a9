"""Implementations of the `bridge` subcommands (parsing lives in bridge.cli)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError


def inspect(path: str) -> int:
    from bridge.checkpoint import TORCH_SUFFIXES, _sniff, open_checkpoint
    if _is_run(Path(path)):
        return _inspect_run(Path(path))
    p = Path(path)
    if p.is_file() and not p.name.endswith((".index.json", ".safetensors", ".pt2", *TORCH_SUFFIXES)) \
            and _sniff(p) is None:
        raise BridgeError(f"{path}: not a checkpoint (neither a safetensors file, a torch.save file, a "
                          "*.index.json nor a .pt2 program)")
    sources = open_checkpoint(path)
    width = max((len(s.name) for s in sources), default=10)
    print(f"{'tensor':<{width}}  {'dtype':<9} shape")
    for s in sources:
        print(f"{s.name:<{width}}  {str(s.dtype).replace('torch.', ''):<9} {tuple(s.shape)}")
    n = sum(int(np.prod(s.shape)) for s in sources)
    n_float = sum(int(np.prod(s.shape)) for s in sources if s.dtype.is_floating_point or s.dtype.is_complex)
    nbytes = sum(s.nbytes for s in sources)
    files = sorted({s.file.name for s in sources})
    # a checkpoint does not say which tensors are parameters: integer buffers (position ids) count as elements
    print(f"\n{len(sources)} tensors, {n:,} elements ({n_float:,} in floating-point tensors), "
          f"{nbytes / 1e6:,.1f} MB in {len(files)} file(s)")
    return 0


def _inspect_run(path: Path) -> int:
    """The latest trainer checkpoint's params and buffers, read from orbax's metadata (no tensor data)."""
    import orbax.checkpoint as ocp
    from bridge.tree import flatten
    step_dir, meta = _latest_step(path)   # absolute: orbax takes no relative path
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


def _convert(model: str, dynamic: str | None, seed: int | None = None):
    """(module, args, kwargs, jm, seconds, rng): rng is jax.random.key(seed) for a model that draws random
    numbers; such a model without --seed is refused with what to do."""
    import jax
    import bridge
    from bridge.models import resolve_model
    from converters.registry import op_name
    jax.config.update("jax_default_matmul_precision", "highest")
    module, args, kwargs = resolve_model(model)
    t0 = time.perf_counter()
    jm = bridge.convert(module, args, kwargs, dynamic=dynamic)
    seconds = time.perf_counter() - t0
    rng = None
    if jm.needs_rng:
        ops = ", ".join(sorted({op_name(n.target) for n in jm.program.nodes if n.name in jm.program.random_nodes}))
        if seed is None:
            raise BridgeError(f"{model}: the model draws random numbers in forward ({ops}); pass --seed N to run "
                              "the JAX model with jax.random.key(N). torch and JAX draw different random streams, "
                              "so outputs that depend on the draws cannot match torch's")
        print(f"note: the model draws random numbers ({ops}); JAX runs with jax.random.key({seed}). torch and "
              "JAX draw different random streams: outputs that depend on the draws are not expected to match")
        rng = jax.random.key(seed)
    return module, args, kwargs, jm, seconds, rng


def _check_out_dir(out: str) -> None:
    """--out, before anything is converted: a directory, or one that can be made (parents included)."""
    from bridge.checkpoint import TORCH_SUFFIXES
    target = Path(out)
    if (target.exists() and not target.is_dir()) or target.suffix in (".safetensors", ".pt2", *TORCH_SUFFIXES):
        raise BridgeError(f"--out {out}: a directory to write the weights and parity.json into, not a file "
                          "(`bridge export` writes single files)")
    ancestor = target.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BridgeError(f"--out {out}: {ancestor} is a file, so the directory cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BridgeError(f"--out {out}: {ancestor} is not writable")


def convert(model: str, out: str, dynamic: str | None, rtol: float | None = None, seed: int | None = None) -> int:
    """Convert, check parity (outputs within `rtol`, default by dtype: 1e-4 for float32, looser for bf16/fp16),
    write the weights and parity.json into `out` (created with its parents). 1 when a check fails."""
    import bridge
    from bridge.atomic import atomic_path
    from bridge.parity import failures, format_report, parity_report, tolerances
    _check_out_dir(out)
    module, args, kwargs, jm, seconds, rng = _convert(model, dynamic, seed)
    print(f"converted in {seconds:.1f}s: {jm}")
    report = parity_report(module, jm, args, kwargs, rng=rng)
    print(format_report(report))
    like = model if Path(model).is_dir() else None
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    bridge.export(jm, out, like=like, format="hf")
    bad = failures(report, rtol)
    with atomic_path(Path(out) / "parity.json") as tmp:
        tmp.write_text(json.dumps({**report, "convert_s": seconds, "rtol": tolerances(report, rtol),
                                   "failures": bad}, indent=2, default=str))
    print(f"wrote {out} (weights + parity.json)")
    if not report["outputs"] and not bad:
        print("FAILED: the model returned no tensor to compare")
        return 1
    for line in bad:
        print(f"FAILED: {line}")
    if not bad:
        print(f"OK: every output within {tolerances(report, rtol)} of torch")
    return 0 if not bad else 1


def verify(model: str, rtol: float | None = None, seed: int | None = None) -> int:
    """Outputs within `rtol` (default by dtype: 1e-5 for float32, looser for bf16/fp16), else the first
    diverging graph node. 0 when all agree, 1 otherwise."""
    from bridge.parity import failures, format_report, parity_report, tolerances
    from bridge.verify import verify as layer_check
    module, args, kwargs, jm, _, rng = _convert(model, None, seed)
    report = parity_report(module, jm, args, kwargs, grads=False, rng=rng)
    print(format_report(report))
    bad = failures(report, rtol, fp32=1e-5)
    if not bad:
        print(f"OK: every output within {tolerances(report, rtol, fp32=1e-5)} of torch")
        return 0
    for line in bad:
        print(f"FAILED: {line}")
    layers = layer_check(module, jm, args, kwargs, rtol=rtol, rng=rng)
    first = layers["first_divergence"]
    if first:
        why = ("\n  this node draws random numbers: torch's and JAX's random streams differ, so it cannot match"
               if first.get("random") else "")
        print(f"DIVERGED first at node {first['node']} ({first['op']}) in layer '{first['layer']}' "
              f"(relative error {first['rel_err']:.3g})\n  at {first['source']}{why}")
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
    path = path.absolute()   # orbax refuses relative paths ("Checkpoint path should be absolute")
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
