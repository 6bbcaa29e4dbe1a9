"""The `bridge` command line: inspect, convert, verify, train, export, demo.

Exit codes: 0 success, 1 a check failed (parity), 2 bad input or usage, 3 an unexpected error, 130 interrupted.
Errors print one line without a traceback unless --debug.

Example:
    $ bridge inspect model.safetensors
    $ bridge verify path/to/hf_dir
"""
from __future__ import annotations

import argparse
import sys


_SEED_HELP = ("for a model that draws random numbers in forward: run JAX with jax.random.key(SEED) (torch and JAX "
              "draw different random streams, so outputs that depend on the draws will not match)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridge", description="PyTorch models into JAX, trained, and back.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="tensors, dtypes, shapes, parameter count and bytes of a checkpoint")
    s.add_argument("path", help=".safetensors, *.index.json, .pt/.bin, .pt2, or a Hugging Face directory")
    s = sub.add_parser("convert", help="convert a model, write its weights and a parity report")
    s.add_argument("model", help="a Hugging Face directory, a .pt2 file (torch.export.save) or package.module:factory")
    s.add_argument("--out", required=True, help="output directory (created, parents included)")
    s.add_argument("--dynamic", choices=["batch", "batch+seq"], default=None)
    s.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance of every output (default by dtype: 1e-4 float32, 2e-2 bfloat16, "
                        "5e-3 float16)")
    s.add_argument("--seed", type=int, default=None, help=_SEED_HELP)
    s = sub.add_parser("verify", help="compare torch and JAX outputs; name the first diverging layer")
    s.add_argument("model", help="a Hugging Face directory, a .pt2 file (torch.export.save) or package.module:factory")
    s.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default by dtype: 1e-5 float32, 2e-2 bfloat16, 5e-3 float16)")
    s.add_argument("--seed", type=int, default=None, help=_SEED_HELP)
    s = sub.add_parser("train", help="train from a TOML config (model, data, optimizer, mesh, steps, checkpoints)")
    s.add_argument("config", help="path to the TOML file")
    s = sub.add_parser("export", help="re-export a checkpoint or trainer run to safetensors/.pt/HF dir")
    s.add_argument("ckpt", help="checkpoint file/dir, or a trainer run directory")
    s.add_argument("--to", required=True, help="target: *.safetensors, *.pt, or a directory (HF)")
    s.add_argument("--like", default=None, help="Hugging Face directory to copy config/tokenizer from")
    s.add_argument("--max-shard-size", default="5GB")
    s.add_argument("--dtype", default=None, help="cast floating tensors, as module.to(dtype) does (e.g. bfloat16)")
    s.add_argument("--ema", action="store_true", help="a trainer run's moving average of the params (ema_decay)")
    from bridge.demo import add_arguments
    add_arguments(sub.add_parser("demo", help="the end-to-end demo on the real all-MiniLM-L6-v2"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bridge import commands
    from bridge.errors import BridgeError
    try:
        if args.command == "inspect":
            return commands.inspect(args.path)
        if args.command == "convert":
            return commands.convert(args.model, args.out, args.dynamic, args.rtol, args.seed)
        if args.command == "verify":
            return commands.verify(args.model, args.rtol, args.seed)
        if args.command == "train":
            return commands.train(args.config)
        if args.command == "export":
            return commands.export(args.ckpt, args.to, args.like, args.max_shard_size, args.dtype, args.ema)
        if args.command == "demo":
            from bridge import demo
            return demo.run(args)
    except (BridgeError, OSError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"bridge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:   # not foreseen: still one line, with what to send in a report
        if args.debug:
            raise
        print(f"bridge {args.command}: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
