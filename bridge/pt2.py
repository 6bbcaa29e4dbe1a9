"""`.pt2` files (torch.export.save): read a program's weights, and write a converted model back as a program
torch runs (`torch.export.load(path).module()`), carrying the weights trained in JAX.

Example:
    >>> jm = bridge.convert(torch.export.load("model.pt2"))
    >>> ...                                              # train in JAX
    >>> bridge.export(jm, "trained.pt2")                 # same program, new weights
"""
from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from bridge.atomic import atomic_path
from bridge.errors import CheckpointError, ExportError
from bridge.tree import flatten
from converters.dtypes import to_torch


def is_program_file(path: Path) -> bool:
    """A torch.export archive (a zip holding `archive_format`), not a torch.save zip."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "archive_format" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load, with an error naming the file when it is not a readable program."""
    log = logging.getLogger("torch.export")   # logs a traceback of its own before raising
    level = log.level
    try:
        log.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return torch.export.load(path)
    except Exception as e:  # torch's deserializer raises many types; the cause is in the message
        raise CheckpointError(f"{path}: not a readable torch.export program ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        log.setLevel(level)


def program_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict a .pt2 program carries (parameters and persistent buffers, by torch name)."""
    return dict(load_program(path).state_dict)


def write_program(jm, path: str | Path) -> Path:
    """Write `jm`'s captured program with `jm`'s current parameters and buffers as a .pt2 file (atomically).
    Names, dtypes and shapes are the program's own; tied weights stay one tensor."""
    program = getattr(jm, "program", None)
    if program is None:
        raise ExportError(f"{path}: a .pt2 file holds a program; export a JaxModule (bridge.convert's result), "
                          "not bare weights")
    ep = program.captured.program
    meta = jm.meta
    flat = {**flatten(jm.buffers), **flatten(jm.params)}
    made: dict[str, torch.Tensor] = {}

    own = {**ep.constants, **ep.state_dict}   # the program's tensors: their dtypes are the graph's

    def tensor(name: str) -> torch.Tensor:
        canon = meta.aliases.get(name, name)
        if canon not in made:
            if canon not in flat or not hasattr(flat[canon], "__array__"):
                raise ExportError(f"cannot export {name!r} to {path}: the model holds no value for it "
                                  "(weights never loaded?)")
            t = to_torch(np.asarray(flat[canon]), meta.torch_dtypes.get(canon))
            # a program captured with compute_dtype runs in that dtype: fp32 master weights go in cast to it
            t = t.to(own[name].dtype) if t.dtype != own[name].dtype else t
            made[canon] = torch.nn.Parameter(t, requires_grad=canon not in meta.frozen) \
                if canon in program.param_names else t
        return made[canon]

    sig = ep.graph_signature
    state = {n: tensor(n) for n in ep.state_dict}
    constants = {n: tensor(n) if meta.aliases.get(n, n) in flat else c for n, c in ep.constants.items()}
    with warnings.catch_warnings():   # torch's own deprecation notes, from copying its tree specs
        warnings.filterwarnings("ignore", category=FutureWarning)
        out = ep._update(ep.graph_module, sig, state_dict=state, constants=constants)
    path = Path(path)
    with atomic_path(path) as tmp:
        try:   # a file object: torch wants a path ending in .pt2, and the temp file's name does not
            with open(tmp, "wb") as f:
                torch.export.save(out, f)
        except Exception as e:  # an op torch's serializer cannot write (e.g. bridge's custom-backward op)
            raise ExportError(f"{path}: torch.export.save failed for this program ({type(e).__name__}: {e}); "
                              "export the weights (.safetensors, .pt, a Hugging Face directory) instead") from e
    return path
