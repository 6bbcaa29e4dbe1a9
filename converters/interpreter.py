"""Walk an ExportedProgram's graph and evaluate each node with its JAX lowering.

`Program` is the converted, torch-free function: `program.run(state, user_leaves, key)`
takes flat state (canonical torch names → arrays) and the flat user inputs, and returns
the flat user outputs plus the mutated buffers. It is pure: jit, grad and vmap apply.

Example:
    >>> prog = Program(capture(model, (x,)))
    >>> outs, new_buffers = prog.run(state, [x_jax], key=None)
"""
from __future__ import annotations

import contextlib
import operator
import os
import re
from collections import Counter, defaultdict
from typing import Any

import jax
import torch
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.node import map_arg

from bridge.errors import InputError, LoweringError, MissingRngError, UnsupportedOpsError
from converters import selected_rows
from converters.capture import Captured
from converters.dtypes import jax_dtype, to_jax
from converters.dynamic import check_sizes
from converters.ops.common import astype
from converters.registry import draws_random, lookup, op_name
from converters.selection import Selection
from converters.structure import spec_structure

_TORCH_DIR = os.path.dirname(torch.__file__)


def source_line(node: torch.fx.Node) -> str:
    """The innermost frame of the node's stack trace outside torch itself: 'file:line in fn: code'."""
    trace = node.meta.get("stack_trace") or ""
    lines = trace.strip().splitlines()
    picked = None
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith('File "'):
            path = line.split('"')[1]
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not path.startswith(_TORCH_DIR):
                picked = f"{path}:{line.split('line ')[1].split(',')[0]} in {line.rsplit(' in ', 1)[-1]}: {code}"
    return picked or f"<graph node {node.name}>"


_DROPPED = object()   # marks graph outputs that are not results: effect tokens, input mutations


def _check_constant(name: str, captured, given) -> None:
    """A Python value (number, bool, string, None) is part of the captured graph: another value would
    be silently ignored, so it raises."""
    both_nan = isinstance(given, float) and isinstance(captured, float) and given != given and captured != captured
    if not (both_nan or given == captured):
        raise InputError(f"input {name!r} is {given!r}, but the model was captured with {captured!r}: "
                         "torch.export bakes Python values into the graph; convert again with this value, "
                         "or pass it as a tensor")


class Program:
    """A lowered graph plus the maps from its placeholders to state and user inputs."""

    def __init__(self, cap: Captured):
        ep = cap.program
        self.captured = cap
        self.graph = ep.graph
        sig = ep.graph_signature
        self.state_inputs: list[tuple[str, str, str]] = []   # (placeholder, kind, canonical name)
        self.user_inputs: list[tuple[str, Any]] = []          # (placeholder, example meta or constant)
        self.constant_inputs: dict[str, Any] = {}             # placeholder → the Python value captured
        self.lifted: dict[str, torch.Tensor] = {}             # constants/non-persistent buffers by name
        self.param_names: list[str] = []
        self.tokens: list[str] = []
        self.buffer_names: list[str] = []
        for spec in sig.input_specs:
            name = spec.arg.name
            if spec.kind == InputKind.USER_INPUT:
                self.user_inputs.append((name, getattr(spec.arg, "value", None)))
                if isinstance(spec.arg, ConstantArgument):   # a Python value torch.export baked in
                    self.constant_inputs[name] = spec.arg.value
                continue
            if spec.kind == InputKind.TOKEN or (   # effect tokens order side effects; JAX programs are pure
                    spec.kind == InputKind.CUSTOM_OBJ and isinstance(ep.constants.get(spec.target), torch.Generator)):
                self.tokens.append(name)   # a torch.Generator made in forward: draws come from `rng`
                continue
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                raise UnsupportedOpsError({f"graph input kind {spec.kind.name}": (1, [spec.target])})
            canon = cap.aliases.get(spec.target, spec.target)
            kind = "param" if spec.kind == InputKind.PARAMETER else "buffer"
            self.state_inputs.append((name, kind, canon))
            names = self.param_names if kind == "param" else self.buffer_names
            if canon not in names:
                names.append(canon)
            if spec.kind == InputKind.CONSTANT_TENSOR or (spec.kind == InputKind.BUFFER and not spec.persistent):
                self.lifted[canon] = ep.constants[spec.target]
        self.non_persistent = set(self.lifted)
        self.mutations: list[str | None] = []  # per graph output: buffer name, or None for user outputs
        placeholder_of = {canon: name for name, _, canon in self.state_inputs}
        self.param_updates: dict[str, str] = {}   # node computing a parameter's in-place update → its placeholder
        for spec in sig.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION:
                self.mutations.append(cap.aliases.get(spec.target, spec.target))
            elif spec.kind == OutputKind.PARAMETER_MUTATION:
                # a parameter updated in place without autograd (Embedding(max_norm) renorms the rows it reads,
                # `with torch.no_grad(): w.clamp_(...)`): later reads see the new values while gradients still
                # reach the parameter as if unchanged, as in torch. Parameters live in `params`, which `apply`
                # does not return, so the update itself is dropped.
                self.param_updates[spec.arg.name] = placeholder_of[cap.aliases.get(spec.target, spec.target)]
                self.mutations.append(_DROPPED)
            elif spec.kind == OutputKind.USER_OUTPUT:
                self.mutations.append(None)
            elif spec.kind in (OutputKind.TOKEN, OutputKind.USER_INPUT_MUTATION):
                # in-place updates of the caller's inputs: JAX arrays are immutable, so they are dropped
                # (the function's outputs, which already read the updated values, are exact)
                self.mutations.append(_DROPPED)
            else:
                raise UnsupportedOpsError({f"graph output kind {spec.kind.name}": (1, [str(spec.target)])})
        self._keep_wide(sig)
        self.in_spec = ep.call_spec.in_spec
        self.out_spec = ep.call_spec.out_spec
        self.placeholder_meta = {n.name: n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"}
        self.nodes = [n for n in self.graph.nodes if n.op == "call_function"]
        for n in self.nodes:   # an update made through a detached alias (a no_grad block's input) is read back
            if n.target is torch.ops.aten.detach.default and getattr(n.args[0], "name", None) in self.param_updates \
                    and not _user_written(n):   # functionalization's detach(update); a user's `.data` stops grads
                self.param_updates[n.name] = self.param_updates[n.args[0].name]
        # subgraphs (torch.cond branches, loop bodies) referenced by get_attr nodes: lowerings receive them
        self.attrs = {n.name: _attr(ep.graph_module, n.target) for n in self.graph.nodes if n.op == "get_attr"}
        self.random_nodes = {n.name: i for i, n in enumerate(self.nodes) if draws_random(n)}
        self._check_supported()
        self.selected_rows = selected_rows.plan(self.nodes)   # x[mask] and what reads it, with static shapes

    def _keep_wide(self, sig) -> None:
        """Values only written back to buffers (BatchNorm's running statistics) keep the buffers' stored
        precision: a graph captured in bf16 from fp32 buffers (compute_dtype) updates them in fp32, as torch's
        autocast does, where bf16 would round a running variance's small steps away."""
        nodes = {n.name: n for n in self.graph.nodes}
        self.wide_inputs: set[str] = set()     # buffer placeholders read at their stored dtype
        self.wide: dict[str, set] = {}         # node → indices of its tuple output (or {None}) not narrowed
        buffer_input = {spec.target: spec.arg.name for spec in sig.input_specs if spec.kind == InputKind.BUFFER}
        for spec in sig.output_specs:
            node = nodes.get(spec.arg.name)
            if spec.kind != OutputKind.BUFFER_MUTATION or node is None or len(node.users) > 1:
                continue
            self.wide.setdefault(node.name, set()).add(None)
            if node.target is operator.getitem:
                self.wide.setdefault(node.args[0].name, set()).add(node.args[1])
            if spec.target in buffer_input:
                self.wide_inputs.add(buffer_input[spec.target])

    # -- checks ---------------------------------------------------------------------------
    def _check_supported(self):
        missing: dict[str, list] = defaultdict(list)
        for n in _call_nodes(self.graph):
            target = n.args[1] if n.target is torch.ops.higher_order.with_effects else n.target
            if lookup(n.target) is None or lookup(target) is None:
                missing[op_name(target)].append(source_line(n))
        if missing:
            raise UnsupportedOpsError({op: (len(srcs), sorted(set(srcs)))
                                       for op, srcs in missing.items()})

    def op_counts(self) -> Counter:
        return Counter(op_name(n.target) for n in self.nodes)

    def check_inputs(self, leaves: list) -> None:
        """Leaves must match the exported inputs in number and in every static dimension."""
        if len(leaves) != len(self.user_inputs):
            raise InputError(f"expected {len(self.user_inputs)} input leaves "
                             f"({[n for n, _ in self.user_inputs]}), got {len(leaves)}")
        shapes = []
        for (name, _), leaf in zip(self.user_inputs, leaves):
            meta = self.placeholder_meta.get(name)
            if name in self.constant_inputs and not hasattr(leaf, "shape"):
                _check_constant(name, self.constant_inputs[name], leaf)
            elif name in self.constant_inputs and self.constant_inputs[name] is None:
                raise InputError(f"input {name!r} was captured as None, so the program does not read it: an "
                                 f"array there would be ignored; convert again with an example array for it")
            if not isinstance(meta, torch.Tensor):
                continue
            shape = getattr(leaf, "shape", None)
            if shape is None or len(shape) != meta.dim():
                raise InputError(f"input {name!r}: expected a {meta.dim()}-d array, got shape {shape}")
            for d, (want, got) in enumerate(zip(meta.shape, shape)):
                # a SymInt torch.export specialized (Dim.AUTO where the code fixes the size) is static too
                if is_concrete_int(want) and int(want) != got:
                    raise InputError(
                        f"input {name!r} dim {d}: exported with static size {want}, got {got} "
                        f"(shape {tuple(shape)}); convert with dynamic='batch' / 'batch+seq' or dynamic_shapes")
            shapes.append((name, meta.shape, shape))
        check_sizes(shapes, self.captured.program.range_constraints)

    # -- evaluation -----------------------------------------------------------------------
    def run(self, state: dict[str, jax.Array], leaves: list, key: jax.Array | None = None, *,
            intermediates: bool = False):
        """Evaluate the graph. Returns (flat user outputs, {buffer name: new value}); with
        intermediates=True also {node name: array} for every tensor-valued node (layer-by-layer checks)."""
        if self.random_nodes and key is None:
            ops = sorted({op_name(n.target) for n in self.nodes if n.name in self.random_nodes})
            raise MissingRngError(f"the program draws random numbers ({', '.join(ops)}); pass rng=jax.random.key(...)")
        # torch semantics need implicit rank and dtype promotion, whatever the user's global config
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return self._run(state, leaves, key, intermediates)

    def _run(self, state, leaves, key, intermediates=False):
        env: dict[str, Any] = {}
        for name, _, canon in self.state_inputs:
            env[name] = state[canon] if name in self.wide_inputs else self._as_captured(name, state[canon])
        for (name, const), leaf in zip(self.user_inputs, leaves):
            env[name] = self._as_captured(name, leaf) if const is None or hasattr(leaf, "shape") else const
        for name in self.tokens:
            env[name] = None
        env.update(self.attrs)
        rows = Selection(self.selected_rows, self.placeholder_meta)
        for node in self.nodes:
            if node.name in rows.rules:
                env[node.name] = rows.eval(node, env, self._key(node, key), eval_node)
            else:
                env[node.name] = self._eval(node, env, key)
            if node.name in self.param_updates:   # new values forward, the parameter's own gradient backward
                old = env[self.param_updates[node.name]]
                env[node.name] = jax.lax.stop_gradient(env[node.name]) + (old - jax.lax.stop_gradient(old))
        out_node = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        results = map_arg(out_node.args[0], lambda n: rows.output(n, env[n.name]) if n.name in rows.rules
                          else env[n.name])
        user, mutated = [], {}
        for target, value in zip(self.mutations, results):
            if target is None:
                user.append(value)
            elif target is not _DROPPED:
                mutated[target] = value
        if intermediates:
            return user, mutated, {n.name: env[n.name] for n in self.nodes if hasattr(env[n.name], "shape")}
        return user, mutated

    def _as_captured(self, name: str, x):
        """A floating input in another float dtype than the graph was captured with (fp32 master weights
        for a program captured in bf16, fp32 images for a bf16 model) is cast to the captured dtype, so
        every op runs in the dtype torch would use; gradients flow back through the cast."""
        meta = self.placeholder_meta.get(name)
        if not isinstance(meta, torch.Tensor) or not meta.dtype.is_floating_point or not hasattr(x, "dtype"):
            return x
        want = jax_dtype(meta.dtype)
        if x.dtype == want or not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return x
        return x.astype(want)

    def captured_dtypes(self) -> dict[str, Any]:
        """State name → the JAX dtype the graph computes that parameter/buffer in."""
        out = {}
        for name, _, canon in self.state_inputs:
            meta = self.placeholder_meta.get(name)
            if isinstance(meta, torch.Tensor):
                out[canon] = jax_dtype(meta.dtype)
        return out

    def _eval(self, node: torch.fx.Node, env: dict, key):
        wide = self.wide.get(node.name, ())
        if None in wide and node.target in _CASTS:   # the graph's own narrowing of a value kept wide
            x = env[node.args[0].name]
            if _match_dtype(x, node.meta.get("val"), wide) is x:
                return x
        return eval_node(node, env, self._key(node, key), wide)

    def _key(self, node: torch.fx.Node, key):
        k = self.random_nodes.get(node.name)
        return None if k is None else jax.random.fold_in(key, k)

    def output_structure(self, flat_outputs: list):
        return spec_structure(self.out_spec, flat_outputs, ordered=True)


_CASTS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _user_written(node: torch.fx.Node) -> bool:
    """Whether a source file (not code FX generated, `<eval_with_key>`) made the node."""
    return any(not f.startswith("<") for f in re.findall(r'File "([^"]+)"', node.meta.get("stack_trace") or ""))


def eval_node(node: torch.fx.Node, env: dict, key, wide=()):
    """One call_function node through its lowering; `key` is this node's own PRNG key (None unless it draws).
    `wide`: output indices (None: the whole output) whose wider floats are not narrowed to torch's dtype."""
    low = lookup(node.target)
    if low is None:   # a subgraph traced while running (a Function's backward) uses an op with no lowering
        raise UnsupportedOpsError({op_name(node.target): (1, [source_line(node)])})
    args = map_arg(node.args, lambda n: _scalar(n, env[n.name]))
    kwargs = map_arg(node.kwargs, lambda n: _scalar(n, env[n.name]))
    try:
        with jax.ensure_compile_time_eval() if _size_arithmetic(node, args, kwargs) else contextlib.nullcontext():
            out = low.fn(key, *args, **kwargs) if low.random else low.fn(*args, **kwargs)
            return _match_dtype(out, node.meta.get("val"), wide)
    except Exception as e:  # re-raised with the op, the user's line and the input shapes
        if isinstance(e, (LoweringError, MissingRngError)):
            raise
        shapes = [getattr(a, "shape", a) for a in args if hasattr(a, "shape")]
        hint = ("\nhint: torch computes this in 64 bits; call jax.config.update('jax_enable_x64', True) before "
                "converting" if isinstance(e, OverflowError) and not jax.config.jax_enable_x64 else "")
        raise LoweringError(f"{op_name(node.target)} failed at {source_line(node)} "
                            f"(input shapes {shapes}): {type(e).__name__}: {e}{hint}") from e


def _scalar(node: torch.fx.Node, value):
    """A Python number in torch (`.item()`, size arithmetic) known while tracing, as a Python number: JAX stages
    arithmetic on arrays even when they are concrete, and an index must stay static."""
    if isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) \
            and isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.ndim == 0:
        return value.item()
    return value


_FOLDED = 64   # the largest result (elements) computed while tracing from untraced inputs


def _size_arithmetic(node: torch.fx.Node, args, kwargs) -> bool:
    """A small result from untraced inputs: sizes that detour through tensors (`torch.tensor(x.size(1))`, then
    `.item()`), indices read from a constant (`for e in torch.arange(E)[:, None]: w[e[0]]`). Evaluated while
    tracing, it stays concrete where JAX needs a static value (slice bounds, shapes, indices)."""
    val = node.meta.get("val")
    small = lambda v: not isinstance(v, torch.Tensor) or (  # noqa: E731
        is_concrete_int(v.numel()) and int(v.numel()) <= _FOLDED)
    if lookup(node.target).random or not small(val):
        return False
    leaves = jax.tree.leaves((args, kwargs))
    return not any(isinstance(x, jax.core.Tracer) or getattr(x, "size", 0) > _FOLDED for x in leaves)


def run_graph(gm: torch.fx.GraphModule, inputs, key=None) -> list:
    """Evaluate a subgraph (a torch.cond branch, a loop body) with the same lowerings: placeholders bound to
    `inputs` in order; returns its flat outputs. Nodes that draw random numbers fold their index into `key`."""
    env: dict[str, Any] = {}
    nodes = list(gm.graph.nodes)
    for n, value in zip([n for n in nodes if n.op == "placeholder"], inputs):
        env[n.name] = value
    # as in Program.run: a custom_vjp backward runs later, outside it
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        for i, n in enumerate(nodes):
            if n.op == "get_attr":
                value = _attr(gm, n.target)
                env[n.name] = to_jax(value) if isinstance(value, torch.Tensor) else value   # make_fx constants
            elif n.op == "call_function":
                draws = key is not None and draws_random(n)
                env[n.name] = eval_node(n, env, jax.random.fold_in(key, i) if draws else None)
    out = map_arg(next(n for n in reversed(nodes) if n.op == "output").args[0], lambda n: env[n.name])
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _attr(gm: torch.nn.Module, target: str):
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


def _call_nodes(graph: torch.fx.Graph):
    """Every call_function node of `graph` and of the subgraphs it references, depth first."""
    for n in graph.nodes:
        if n.op == "call_function":
            yield n
        elif n.op == "get_attr":
            sub = _attr(graph.owning_module, n.target)
            if isinstance(sub, torch.fx.GraphModule):
                yield from _call_nodes(sub.graph)


def _match_dtype(out, meta, wide=()):
    """Cast each result to the dtype torch gives this node: one place for promotion rules. Floats of the
    `wide` outputs (indices; None for the whole) keep a wider float dtype."""
    if isinstance(meta, torch.Tensor) and hasattr(out, "dtype"):
        want = jax_dtype(meta.dtype)
        if None in wide and jax.numpy.issubdtype(out.dtype, jax.numpy.floating) and \
                jax.numpy.issubdtype(want, jax.numpy.floating) and out.dtype.itemsize > want.itemsize:
            return out
        return out if out.dtype == want else astype(out, want)
    if isinstance(meta, (list, tuple)) and isinstance(out, (list, tuple)):
        return type(out)(_match_dtype(o, m, (None,) if i in wide else ()) for i, (o, m) in enumerate(zip(out, meta)))
    return out
