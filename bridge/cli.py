"""The `bridge` command line.

Example:
    $ bridge demo
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridge", description="PyTorch models into JAX and back.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="convert a small GPT-2 and print its parity report")
    args = parser.parse_args(argv)
    from bridge.errors import BridgeError
    try:
        if args.command == "demo":
            from bridge.demo import main as demo
            return demo()
    except BridgeError as e:
        if args.debug:
            raise
        print(f"bridge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
