"""Optimizer state between torch.optim and optax, so a run can move mid-training either way: Adam/AdamW
moments and SGD's momentum buffers.

torch keeps `exp_avg`, `exp_avg_sq` and `step` per parameter index (SGD: `momentum_buffer`, no step); optax
keeps `mu`, `nu` (trees keyed like the params) and `count` in every Adam state of the chain, `trace` in SGD's
momentum (`optax.trace`, torch's buffer with dampening 0, nesterov or not), and schedules count too. Indices map
to names through the state_dict's `param_names` (optimizers built from `model.named_parameters()`), else
through the model's parameter order (all parameters, or the trainable ones when that is the count).

Example:
    >>> state = trainer.init_state()
    >>> state = load_torch_optimizer(state, torch.load("ckpt.pt")["optimizer"], jm)
    >>> state = trainer.fit(batches, state=state)
    >>> torch_opt.load_state_dict(torch_optimizer_state(state, jm, like=torch_opt.state_dict()))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.tree_util import DictKey, GetAttrKey

from bridge.errors import CheckpointError
from bridge.state import gathered
from bridge.tree import flatten
from converters.dtypes import to_jax, to_torch

_MOMENTS = {"mu": "exp_avg", "nu": "exp_avg_sq", "trace": "momentum_buffer"}   # optax field -> torch key
_FAMILIES = {"Adam/AdamW": ("exp_avg", "exp_avg_sq"), "SGD with momentum": ("momentum_buffer",)}


def _index_names(groups: list[dict], jm) -> list[str]:
    """Parameter name of each torch optimizer index, in index order."""
    indices = [i for g in groups for i in g["params"]]
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
    else:
        every = list(flatten(jm.params))
        trainable = [n for n in every if n not in jm.meta.frozen]
        names = every if len(indices) == len(every) else trainable if len(indices) == len(trainable) else None
        if names is None:
            raise CheckpointError(f"the optimizer holds {len(indices)} parameters and the model {len(every)} "
                                  f"({len(trainable)} trainable); build it from model.named_parameters() so its "
                                  "state_dict names them")
    by_index = dict(zip(indices, names))
    return [by_index[i] for i in sorted(by_index)]


def _param_name(path) -> tuple[str | None, str]:
    """('mu'/'nu'/'count'/None, dotted param name) of an optimizer-state leaf path."""
    for i, key in enumerate(path):
        if isinstance(key, GetAttrKey) and key.name in _MOMENTS:
            return key.name, ".".join(str(k.key) for k in path[i + 1:] if isinstance(k, DictKey))
    last = path[-1] if path else None
    return ("count" if isinstance(last, GetAttrKey) and last.name == "count" else None), ""


def load_torch_optimizer(state, torch_state: dict, jm, *, step: int | None = None):
    """`state` (a TrainState) with its optimizer state from a torch Adam/AdamW or SGD(momentum) state_dict.

    Every optax Adam state in the chain gets `mu`/`nu` from `exp_avg`/`exp_avg_sq`, every `optax.trace`
    (SGD's momentum) its `trace` from `momentum_buffer`, and every `count` (Adam's bias correction,
    learning-rate schedules) torch's `step`; shardings are kept. torch's SGD keeps no step: pass `step`
    (the steps taken) where the optax chain counts them.
    """
    per_param = torch_state.get("state", {})
    names = _index_names(torch_state.get("param_groups", []), jm)
    values = {name: per_param[i] for i, name in enumerate(names) if i in per_param}
    family = next((f for f, keys in _FAMILIES.items()
                   if values and all(v.get(k) is not None for v in values.values() for k in keys)), None)
    steps = {float(v["step"]) for v in values.values() if "step" in v}
    if family is None or len(steps) > 1 or (family == "Adam/AdamW" and not steps):
        raise CheckpointError("not an Adam/AdamW state_dict with one step count (needs exp_avg, exp_avg_sq, step "
                              "per parameter) nor an SGD one with momentum (momentum_buffer per parameter)")
    step = int(steps.pop()) if steps else step
    kinds = {_param_name(path)[0] for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    wanted = {k for k, key in _MOMENTS.items() if key in _FAMILIES[family]}
    if not wanted <= kinds or kinds & (set(_MOMENTS) - wanted):
        raise CheckpointError(f"a torch {family} state_dict cannot fill the optax chain's state (it holds "
                              f"{sorted(kinds & set(_MOMENTS)) or 'no moments'}, torch gives "
                              f"{', '.join(_FAMILIES[family])}): build the optax optimizer of the same family")

    def put(path, leaf):
        kind, name = _param_name(path)
        if kind == "count":
            if step is None:
                raise CheckpointError("torch's SGD state_dict keeps no step count and the optax chain counts steps "
                                      "(a schedule): pass step= (the steps taken) to load_torch_optimizer")
            return jnp.full(leaf.shape, step, leaf.dtype)
        if kind in _MOMENTS and name in values and hasattr(leaf, "shape"):
            t = values[name][_MOMENTS[kind]]
            if tuple(t.shape) != tuple(leaf.shape):
                raise CheckpointError(f"{_MOMENTS[kind]} of {name!r} has shape {tuple(t.shape)}, the model's "
                                      f"{tuple(leaf.shape)}")
            arr = to_jax(t, f"{_MOMENTS[kind]} of {name!r}").astype(leaf.dtype)
            return jax.device_put(arr, leaf.sharding) if isinstance(leaf, jax.Array) else arr
        return leaf

    return state.replace(opt_state=jax.tree_util.tree_map_with_path(put, state.opt_state))


def torch_optimizer_state(state, jm, *, like: dict) -> dict:
    """A torch Adam/AdamW (or SGD momentum) state_dict of `state`'s optimizer state: `like` (the torch optimizer's
    own state_dict) gives the param_groups (hyperparameters, index order) that `optimizer.load_state_dict`
    checks."""
    names = _index_names(like["param_groups"], jm)
    found: dict[str, dict] = {}
    counts = []
    leaves, _ = jax.tree_util.tree_flatten_with_path(gathered(state.opt_state))   # multi-host: whole arrays
    for path, leaf in leaves:
        kind, name = _param_name(path)
        if kind == "count":
            counts.append(int(np.asarray(leaf)))
        elif kind in _MOMENTS:
            found.setdefault(name, {})[_MOMENTS[kind]] = to_torch(np.asarray(leaf))
    if not found:
        raise CheckpointError("the optimizer state holds no Adam moments (mu/nu) nor SGD momentum (trace)")
    step = torch.tensor(float(counts[0] if counts else int(state.step)))
    adam = any("exp_avg" in v for v in found.values())   # torch's SGD keeps no step
    out = {i: ({"step": step.clone()} if adam else {}) | found[name] for i, name in enumerate(names) if name in found}
    return {"state": out, "param_groups": [dict(g) for g in like["param_groups"]]}
