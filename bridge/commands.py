"""Implementations of the `bridge` subcommands (parsing lives in bridge.cli)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bridge.errors import BridgeError


def inspect(path: str) -> int:
    from bridge.checkpoint import open_checkpoint
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
    module, args, kwargs, jm, seconds = _convert(model, dynamic)
    print(f"converted in {seconds:.1f}s: {jm}")
    report = parity_report(module, jm, args, kwargs)
    print(format_report(report))
    like = model if Path(model).is_dir() else None
    bridge.export(jm, out, like=like)
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


def export(ckpt: str, to: str, like: str | None, max_shard_size: str) -> int:
    import bridge
    src = Path(ckpt)
    params = _orbax_params(src) if (src / "checkpoints").is_dir() or _is_orbax(src) else bridge.load_weights(src)
    written = bridge.export(params, to, like=like, max_shard_size=max_shard_size)
    print(f"wrote {written}")
    return 0


def _is_orbax(path: Path) -> bool:
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def _orbax_params(path: Path):
    """The params of the latest checkpoint of a trainer run directory (or its checkpoints/ dir)."""
    import orbax.checkpoint as ocp
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    if not steps:
        raise BridgeError(f"{root}: no trainer checkpoints found")
    restored = ocp.StandardCheckpointer().restore(root / str(steps[-1]) / "state")
    return {**restored["params"], **restored.get("buffers", {})}


def train(config_path: str) -> int:
    from bridge.train_config import run_from_toml
    return run_from_toml(config_path)
