"""`make demo`: convert a Hugging Face GPT-2 built from a small config and print its parity report.

Run: python -m bridge.demo
"""
from __future__ import annotations

import os
import time


def main() -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import jax
    import torch
    import transformers

    import bridge
    from bridge.parity import format_report, parity_report

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=50257, n_positions=256)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    print(f"GPT-2 ({cfg.n_layer} layers, d={cfg.n_embd}, {sum(p.numel() for p in model.parameters()):,} params)")
    t0 = time.perf_counter()
    jm = bridge.convert(model, kwargs={"input_ids": ids}, dynamic="batch+seq")
    print(f"converted in {time.perf_counter() - t0:.1f}s: {jm}")
    for shape in [(2, 64), (3, 40)]:
        x = torch.randint(0, cfg.vocab_size, shape)
        print(f"\nparity at batch x seq = {shape[0]} x {shape[1]}:")
        print(format_report(parity_report(model, jm, kwargs={"input_ids": x}, grads=shape == (2, 64))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
