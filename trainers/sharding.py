"""Mesh construction and sharding rules: a table of name pattern → PartitionSpec for tensor
parallelism (torch layouts), FSDP on the largest divisible free dimension of every matrix, and a
report of what stays replicated.

Example:
    >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    >>> shardings = param_shardings(params, mesh)           # nested like params
    >>> print(replication_report(params, shardings))
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bridge.tree import flatten, nest

AXES = ("data", "fsdp", "tensor")
T = "tensor"

# (regex on the torch name, PartitionSpec in torch's own layout). First match wins.
# nn.Linear weights are (out, in): column-parallel shards dim 0, row-parallel dim 1.
# GPT-2's Conv1D weights are (in, out), hence the opposite specs.
TENSOR_RULES: list[tuple[str, P]] = [
    # Llama / Mistral / Qwen style
    (r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", P(T, None)),
    (r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", P(T)),
    (r"\.(o_proj|down_proj)\.weight$", P(None, T)),
    (r"(^|\.)embed_tokens\.weight$", P(None, T)),
    (r"(^|\.)lm_head\.weight$", P(T, None)),
    # GPT-2 (Conv1D: (in, out))
    (r"\.attn\.c_attn\.weight$", P(None, T)),
    (r"\.attn\.c_attn\.bias$", P(T)),
    (r"\.mlp\.c_fc\.weight$", P(None, T)),
    (r"\.mlp\.c_fc\.bias$", P(T)),
    (r"\.(attn|mlp)\.c_proj\.weight$", P(T, None)),
    (r"(^|\.)wte\.weight$", P(None, T)),
    # BERT
    (r"\.attention\.self\.(query|key|value)\.weight$", P(T, None)),
    (r"\.attention\.self\.(query|key|value)\.bias$", P(T)),
    (r"\.attention\.output\.dense\.weight$", P(None, T)),
    (r"\.intermediate\.dense\.weight$", P(T, None)),
    (r"\.intermediate\.dense\.bias$", P(T)),
    (r"\.layer\.\d+\.output\.dense\.weight$", P(None, T)),
    (r"(^|\.)word_embeddings\.weight$", P(None, T)),
]


def make_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); unspecified axes get size 1, default all on data."""
    devices = list(devices if devices is not None else jax.devices())
    axes = dict(axes or {"data": len(devices)})
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {AXES}")
    sizes = [int(axes.get(a, 1)) for a in AXES]
    if -1 in sizes:
        i = sizes.index(-1)
        sizes[i] = len(devices) // math.prod(s for s in sizes if s != -1)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def _spec_for(name: str, shape: tuple, mesh: Mesh, rules) -> P:
    dims: list = [None] * len(shape)
    tsize = mesh.shape[T]
    if tsize > 1:
        for pattern, spec in rules:
            if re.search(pattern, name):
                for d, axis in enumerate(tuple(spec)[: len(shape)]):
                    if axis is not None and shape[d] % tsize == 0:
                        dims[d] = axis
                break
    fsize = mesh.shape["fsdp"]
    # FSDP shards matrices only: 1-d biases and norm scales are tiny, and XLA's CPU partitioner
    # miscomputes `bias + x @ w` when the bias is split over the axis that also splits the batch.
    if fsize > 1 and len(shape) >= 2:
        tp = [d for d in range(len(shape)) if dims[d] is not None]
        if tp and shape[tp[0]] % (fsize * tsize) == 0:
            # a tensor-parallel matrix also splits its tensor dim over fsdp: (fsdp, tensor) on one dim
            dims[tp[0]] = ("fsdp", T)
        else:
            free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % fsize == 0]
            if free:
                dims[max(free, key=lambda d: shape[d])] = "fsdp"
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def param_specs(params, mesh: Mesh, rules=None) -> dict:
    """PartitionSpec per parameter (nested like params)."""
    rules = TENSOR_RULES if rules is None else rules
    return nest({k: _spec_for(k, tuple(v.shape), mesh, rules) for k, v in flatten(params).items()})


def param_shardings(params, mesh: Mesh, rules=None) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading dim over data × fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def check_batch_split(mesh: Mesh) -> None:
    """Multi-host: every process feeds its own rows, taken as its share of the global batch. So the batch's
    data x fsdp shards must split over the processes, each holding an equal, contiguous, distinct block of rows;
    a mesh that replicates the batch across processes (e.g. {"tensor": 8} over 2 processes) is refused, naming it."""
    count = jax.process_count()
    if count == 1:
        return
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    held: dict[int, set] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((n,)).items():
        held.setdefault(device.process_index, set()).add(index[0].start or 0)
    blocks = list(held.values())
    if (len(held) == count and sum(map(len, blocks)) == n and all(len(b) == n // count for b in blocks)
            and all(max(b) - min(b) + 1 == len(b) for b in blocks)):
        return
    shares = {p: sorted(b) for p, b in sorted(held.items())}
    raise ValueError(
        f"mesh {dict(mesh.shape)} over {count} processes: the batch splits over data x fsdp = {n} shards, which "
        f"do not give each process its own equal block of rows (shards by process: {shares}; copies of the same "
        "rows on different processes would each take that process's rows as the whole batch), but every process "
        f"feeds its own rows: make data x fsdp a multiple of the process count, e.g. mesh={{'data': {count}, "
        f"'tensor': {mesh.devices.size // count}}}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replication_report(params, specs, mesh: Mesh | None = None) -> dict:
    """Parameters left fully replicated and their share of the parameter bytes."""
    flat, sflat = flatten(params), flatten(specs) if not isinstance(specs, P) else {}
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in flat.values()) or 1
    rep = {k: int(np.prod(v.shape)) * v.dtype.itemsize for k, v in flat.items()
           if all(a is None for a in tuple(_as_spec(sflat.get(k, P()))))}
    return {"replicated": sorted(rep), "replicated_bytes": sum(rep.values()), "total_bytes": total,
            "replicated_share": sum(rep.values()) / total}


def _as_spec(s):
    return s.spec if isinstance(s, NamedSharding) else s


def format_report(report: dict) -> str:
    names = report["replicated"]
    head = f"{len(names)} parameters replicated ({report['replicated_share']:.1%} of parameter bytes)"
    return head + (": " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") if names else "")
