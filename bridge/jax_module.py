"""`JaxModule`: a converted model as a pytree of (params, buffers) plus a pure `apply`.

Example:
    >>> jm = bridge.convert(model, (x,))
    >>> y = jax.jit(jm.apply)(jm.params, x_jax)
    >>> grads = jax.grad(lambda p: jm.apply(p, x_jax).sum())(jm.params)
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import torch

from bridge.errors import InputError, StateError
from bridge.tree import flatten, nest
from converters.interpreter import Program
from converters.packed import packed_inputs
from converters.structure import as_jax_inputs, children, input_leaf, spec_leaves


@dataclasses.dataclass(frozen=True, eq=False)
class StateMeta:
    """What export needs to rebuild torch's state_dict exactly."""
    torch_dtypes: dict[str, torch.dtype]     # every state name → original torch dtype
    aliases: dict[str, str]                  # tied names (all of them) → canonical leaf name
    non_persistent: frozenset[str]           # buffers/constants torch leaves out of state_dict
    state_dict_keys: tuple[str, ...]         # module.state_dict() order
    frozen: frozenset[str] = frozenset()     # parameters with requires_grad=False: apply stops their gradient
    # checkpoint keys the model's own loader passes over (regexes; transformers' _keys_to_ignore_on_load_*)
    ignore_unexpected: tuple[str, ...] = ()
    ignore_missing: tuple[str, ...] = ()
    # a transformers model whose checkpoints use other names/layouts (bridge.hf_layout): its config as JSON
    hf_config: str | None = None

    def to_json(self) -> str:
        """The record as JSON (torch dtypes by name), e.g. kept beside a trainer's checkpoints."""
        return json.dumps({"torch_dtypes": {k: str(v).removeprefix("torch.") for k, v in self.torch_dtypes.items()},
                           "aliases": self.aliases, "non_persistent": sorted(self.non_persistent),
                           "state_dict_keys": list(self.state_dict_keys), "frozen": sorted(self.frozen),
                           "ignore_unexpected": list(self.ignore_unexpected),
                           "ignore_missing": list(self.ignore_missing), "hf_config": self.hf_config}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StateMeta":
        d = json.loads(text)
        return cls(torch_dtypes={k: getattr(torch, v) for k, v in d["torch_dtypes"].items()},
                   aliases=dict(d["aliases"]), non_persistent=frozenset(d["non_persistent"]),
                   state_dict_keys=tuple(d["state_dict_keys"]), frozen=frozenset(d.get("frozen", ())),
                   ignore_unexpected=tuple(d.get("ignore_unexpected", ())),
                   ignore_missing=tuple(d.get("ignore_missing", ())), hf_config=d.get("hf_config"))


def _merge(treedef, mask, consts, arrays):
    """The tree `treedef` with arrays where `mask` is set and the Python values `consts` elsewhere."""
    it_arrays, it_consts = iter(arrays), iter(consts)
    return jax.tree.unflatten(treedef, [next(it_arrays) if m else next(it_consts) for m in mask])


def _as_captured_values(static: dict, kwargs: dict) -> dict:
    """kwargs, where an array is given for an input captured as a Python value (`convert(static=...)`, a
    list of image sizes), as that Python value, so it is checked against the captured one."""
    out = dict(kwargs)
    for name, captured in static.items():
        given = kwargs.get(name)
        if hasattr(given, "shape") and isinstance(captured, (list, tuple)):
            if isinstance(given, jax.core.Tracer):
                raise InputError(f"input {name!r} was captured as the Python value {captured!r} (static): pass "
                                 "it concretely (an array or list, not traced) or leave it out")
            out[name] = np.asarray(given).tolist()
    return out


@jax.tree_util.register_pytree_node_class
class JaxModule:
    """params/buffers are nested dicts whose '.'-joined paths are the torch names."""

    def __init__(self, program: Program, params: dict, buffers: dict, meta: "StateMeta"):
        self.program = program
        self.params = params
        self.buffers = buffers
        self.meta = meta
        self._jit_call = None   # __call__'s compiled apply (params and buffers are its arguments)
        self._out_static: dict = {}   # per input signature: the outputs' structure and Python values

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.params, self.buffers), (self.program, self.meta)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], children[1], aux[1])

    def replace(self, *, params=None, buffers=None) -> "JaxModule":
        """A copy with new params and/or buffers (same program)."""
        return JaxModule(self.program, self.params if params is None else params,
                         self.buffers if buffers is None else buffers, self.meta)

    def load_weights(self, source, *, strict: bool = True, dtype=None, shardings=None):
        """Put checkpoint weights (a path, a torch state_dict or a params pytree) into a copy of this module.

        Returns (JaxModule, KeyReport). With strict=True a missing, unexpected, shape- or
        dtype-mismatched key raises `KeyMismatchError` listing all of them.

        Example:
          >>> jm, report = jm.load_weights("model.safetensors")
          >>> jm, report = jm.load_weights(torch_model.state_dict())
        """
        from bridge.state import load_into
        return load_into(self, source, strict=strict, dtype=dtype, shardings=shardings)

    # -- calling --------------------------------------------------------------------------
    @property
    def needs_rng(self) -> bool:
        return bool(self.program.random_nodes)

    @property
    def mutates_buffers(self) -> bool:
        return any(isinstance(m, str) for m in self.program.mutations)

    def user_leaves(self, args: tuple, kwargs: dict) -> list:
        """Flatten (args, kwargs) in the exported order, converting torch/numpy arrays."""
        spec = self.program.in_spec
        cap = self.program.captured
        args, kwargs = packed_inputs((tuple(args), dict(kwargs)))   # torch PackedSequences: padded + lengths
        kwargs = {**cap.extra_kwargs, **cap.static_kwargs, **_as_captured_values(cap.static_kwargs, kwargs)}
        n_static = len(cap.static_args)
        n_all = children(spec)[0].num_children if spec.num_children == 2 else 0
        if n_all - n_static <= len(args) < n_all:
            args = (*args, *cap.static_args[len(args) - (n_all - n_static):])
        names = list(children(spec)[1].context) if spec.num_children == 2 else []
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise InputError(f"unexpected keyword input(s) {unknown}; the model was exported with {names}")
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise InputError(f"missing keyword input(s) {missing}; the model was exported with {names}")
        n_pos = children(spec)[0].num_children if spec.num_children == 2 else 0
        if len(args) != n_pos:
            raise InputError(f"expected {n_pos} positional input(s) as exported, got {len(args)}")
        try:
            if spec.num_children == 2:   # (args, kwargs): paths start at the argument's name
                args_spec, kwargs_spec = children(spec)
                leaves = spec_leaves(args_spec, tuple(args), "args") + [
                    x for k, c in zip(kwargs_spec.context, children(kwargs_spec)) for x in spec_leaves(c, kwargs[k], k)]
            else:
                leaves = spec_leaves(spec, (tuple(args), kwargs), "inputs")
        except ValueError as e:
            raise InputError(f"inputs do not match the exported structure: {e}") from None
        leaves = [input_leaf(x) for x in leaves]
        self.program.check_inputs(leaves)
        return leaves

    def apply(self, params: dict, *args, buffers: dict | None = None, rng: jax.Array | None = None,
              return_buffers: bool = False, **kwargs):
        """Pure forward. With return_buffers=True returns (outputs, updated buffers)."""
        buffers = self.buffers if buffers is None else buffers
        state = {**flatten(buffers), **flatten(params)}
        for n in self.meta.frozen & state.keys():   # torch's requires_grad=False: no gradient flows to it
            state[n] = jax.lax.stop_gradient(state[n])
        need = self.program.param_names + self.program.buffer_names
        missing = [n for n in need if n not in state]
        if missing:
            raise StateError(f"missing state entries: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        leaves = self.user_leaves(args, kwargs)
        flat_out, mutated = self.program.run(state, leaves, rng)
        out = self.program.output_structure(flat_out)
        if not return_buffers:
            return out
        new = flatten(buffers)   # updates keep the buffers' stored dtype (fp32 stats of a graph run in bf16)
        new.update({k: v.astype(new[k].dtype) if k in new and hasattr(new[k], "dtype") else v
                    for k, v in mutated.items()})
        return out, nest(new)

    def __call__(self, *args, rng=None, **kwargs):
        """`apply` with the stored state, compiled once per input signature: torch tensors, numpy arrays and
        caches are taken as they come, Python values (flags) are static. Eager op-by-op dispatch would compile
        every op on its own, much slower on a first call.

        Example:
            >>> logits = jm(input_ids=ids)["logits"]
        """
        leaves, treedef = jax.tree.flatten(as_jax_inputs((args, kwargs)), is_leaf=lambda x: x is None)
        mask = tuple(isinstance(x, jax.Array) for x in leaves)
        consts = tuple(x for x, m in zip(leaves, mask) if not m)
        arrays = [x for x, m in zip(leaves, mask) if m]
        try:
            key = (treedef, mask, consts)
            hash(key)
        except TypeError:   # an unhashable Python value: run op by op
            return self.apply(self.params, *args, buffers=self.buffers, rng=rng, **kwargs)
        out_arrays = self._compiled()(key, self.params, self.buffers, arrays, rng)
        return _merge(*self._out_static[key], out_arrays)

    def _compiled(self):
        if self._jit_call is None:
            def call(key, params, buffers, arrays, rng):
                args, kwargs = _merge(*key, arrays)
                out = self.apply(params, *args, buffers=buffers, rng=rng, **kwargs)
                leaves, treedef = jax.tree.flatten(out, is_leaf=lambda x: x is None)
                mask = tuple(isinstance(x, jax.Array) for x in leaves)
                self._out_static[key] = (treedef, mask, tuple(x for x, m in zip(leaves, mask) if not m))
                return [x for x, m in zip(leaves, mask) if m]
            self._jit_call = jax.jit(call, static_argnums=0)
        return self._jit_call

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return (f"JaxModule({len(flatten(self.params))} params tensors, {n:,} parameters, "
                f"{len(flatten(self.buffers))} buffers, {len(self.program.nodes)} ops)")
