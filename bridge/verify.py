"""Layer-by-layer verification: run the exported graph in torch and in JAX on the same inputs and
name the first node (op, module path, source line) where they diverge.

Example:
    >>> result = verify(model, jm, kwargs={"input_ids": ids})
    >>> result["first_divergence"]        # None when every node agrees
"""
from __future__ import annotations

import numpy as np
import torch

from bridge.parity import default_rtol
from bridge.tree import flatten
from converters.dtypes import to_torch
from converters.interpreter import source_line
from converters.registry import op_name


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _torch_values(jm, args, kwargs) -> dict[str, torch.Tensor]:
    prog = jm.program
    ep = prog.captured.program
    state = {**{k: v for k, v in ep.state_dict.items()}, **ep.constants}
    placeholders = []
    leaves = jm.user_leaves(args, kwargs)
    user = {name: leaf for (name, _), leaf in zip(prog.user_inputs, leaves)}
    spec_by_name = {s.arg.name: s for s in ep.graph_signature.input_specs}
    for n in ep.graph.nodes:
        if n.op != "placeholder":
            continue
        spec = spec_by_name[n.name]
        if n.name in user:
            v, meta = user[n.name], n.meta.get("val")
            if hasattr(v, "shape"):   # JAX holds int64 inputs as int32: torch replays them in the graph's dtype
                # (to_torch: bf16/fp16/float8 arrays, which torch.from_numpy does not take, come across bit-exact)
                v = to_torch(v, meta.dtype if isinstance(meta, torch.Tensor) else None)
            placeholders.append(v)
        else:
            placeholders.append(state[spec.target])
    rec = _Recorder(ep.graph_module)
    with torch.no_grad():
        rec.run(*placeholders)
    return rec.values


def _node_err(r: torch.Tensor, g) -> float:
    """Relative error (floating/complex: to the node's scale) or mismatch fraction (integers, bool)."""
    if not r.numel():
        return 0.0
    if r.dtype == torch.bool or not (r.is_floating_point() or r.is_complex()):
        return float(np.mean(np.asarray(g).astype(np.int64) != r.numpy().astype(np.int64)))
    wide = torch.complex128 if r.is_complex() else torch.float64
    rr = r.resolve_conj().to(wide).numpy()
    gg = np.asarray(g).astype(rr.dtype)
    return float(np.max(np.abs(gg - rr)) / max(np.max(np.abs(rr)), 1e-12))


def verify(module: torch.nn.Module, jm, args=(), kwargs=None, *, rtol: float | None = 1e-5, rng=None) -> dict:
    """Compare every tensor-valued graph node of torch and JAX; report per-node errors and the first
    divergence (relative to each node's scale).

    `rtol=None`: each node by its dtype's default (`bridge.parity.default_rtol(dtype, 1e-5)`: bf16/fp16 looser).
    `rng`: the PRNG key of a model that draws random numbers; nodes that draw are marked "random": True (torch's
    and JAX's streams differ, so they and what depends on them diverge). An op in the root module's own
    forward is in layer '<root>'."""
    kwargs = kwargs or {}
    ref = _torch_values(jm, args, kwargs)
    leaves = jm.user_leaves(args, kwargs)
    state = {**flatten(jm.buffers), **flatten(jm.params)}
    _, _, got = jm.program.run(state, leaves, rng, intermediates=True)
    rows, first = [], None
    for node in jm.program.nodes:
        if node.name not in ref or node.name not in got:
            continue
        r = ref[node.name]
        err = _node_err(r, got[node.name])
        stack = node.meta.get("nn_module_stack") or {}
        layer = (list(stack.values())[-1][0] if stack else "") or "<root>"
        row = {"node": node.name, "op": op_name(node.target), "layer": layer, "rel_err": err}
        if node.name in jm.program.random_nodes:
            row["random"] = True
        rows.append(row)
        tol = rtol if rtol is not None else default_rtol(r.dtype, 1e-5)
        if first is None and not err <= tol:
            first = {**row, "source": source_line(node)}
    return {"nodes": rows, "first_divergence": first, "max_rel_err": max((r["rel_err"] for r in rows), default=0.0)}
