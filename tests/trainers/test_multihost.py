"""Multi-host training on one machine: two CPU processes (4 devices each, gloo collectives) train with FSDP
over all 8 devices, and their losses and final parameters match a single process holding all 8 devices.

Process 0 takes the coordinator from TrainConfig, process 1 from the JAX_* environment variables, so both
ways `trainers.distributed.maybe_initialize` starts `jax.distributed` are exercised.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests.trainers.multihost_worker"
STEPS = 8
TIMEOUT_S = 240
TOL = 1e-5  # relative


def _gloo_available() -> str | None:
    try:
        from jax._src.lib import _jax
    except ImportError as e:  # pragma: no cover - depends on the jaxlib build
        return f"cannot inspect jaxlib for gloo: {e}"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):  # pragma: no cover
        return "this jaxlib has no gloo CPU collectives (_jax.make_gloo_tcp_collectives missing)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """The workers' environment: no inherited coordinator or proxies; the worker sets XLA_FLAGS itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") and "_proxy" not in k.lower() and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    def __init__(self, name: str, args: list[str], log_dir: Path, module: str = WORKER, timeout_s: int = TIMEOUT_S):
        self.name = name
        self.stdout_path, self.stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        cmd = [sys.executable, "-m", module, *args, "--hang-timeout", str(timeout_s - 20)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self._out, stderr=self._err)

    def wait(self, deadline: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._out.close()
            self._err.close()

    def tail(self, n: int = 3000) -> str:
        out, err = (p.read_text(errors="replace") for p in (self.stdout_path, self.stderr_path))
        return (f"--- {self.name}: exit {self.proc.returncode}\n--- stdout (tail):\n{out[-n // 3:]}\n"
                f"--- stderr (tail):\n{err[-n:]}")

    def report(self) -> dict:
        lines = [line for line in self.stdout_path.read_text().splitlines() if line.startswith("{")]
        return json.loads(lines[-1])


def _run_all(tmp_path: Path):
    port = _free_port()
    shared = tmp_path / "multi"  # one run directory for both processes: orbax saves there collectively
    workers = [
        Worker("single", ["--single", "--run-dir", str(tmp_path / "single"), "--steps", str(STEPS)], tmp_path),
        Worker("process0", ["--process-id", "0", "--num-processes", "2", "--port", str(port),
                            "--devices-per-process", "4", "--run-dir", str(shared), "--steps", str(STEPS),
                            "--init", "config"], tmp_path),
        Worker("process1", ["--process-id", "1", "--num-processes", "2", "--port", str(port),
                            "--devices-per-process", "4", "--run-dir", str(shared), "--steps", str(STEPS),
                            "--init", "env"], tmp_path),
    ]
    deadline = time.monotonic() + TIMEOUT_S
    codes = [w.wait(deadline) for w in workers]
    tails = "\n".join(w.tail() for w in workers)
    for w, code in zip(workers, codes):
        assert code is not None, f"{w.name} did not finish within {TIMEOUT_S} s (killed)\n{tails}"
        assert code == 0, f"{w.name} exited with {code}\n{tails}"
    try:
        return [w.report() for w in workers], tails
    except (json.JSONDecodeError, IndexError) as e:
        raise AssertionError(f"a worker printed no JSON report ({e})\n{tails}") from None


def _losses_by_step(report: dict, who: str, num_processes: int, tails: str) -> list[float]:
    """One loss per step from the metrics records, checking that repeated records of a step agree."""
    by_step: dict[int, list[float]] = {}
    for r in report["metrics"]:
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert sorted(by_step) == list(range(1, STEPS + 1)), f"{who}: metrics steps {sorted(by_step)}\n{tails}"
    for step, values in by_step.items():
        # only process 0 writes metrics, so a shared run dir holds exactly one record per step
        assert len(values) == 1, f"{who}: step {step} logged {len(values)} times\n{tails}"
        assert len(set(values)) == 1, f"{who}: step {step} logged different losses {values}\n{tails}"
    return [by_step[s][0] for s in range(1, STEPS + 1)]


def test_two_processes_match_single_process(tmp_path):
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    (single, p0, p1), tails = _run_all(tmp_path)

    for rep, pid, count, local in ((single, 0, 1, 8), (p0, 0, 2, 4), (p1, 1, 2, 4)):
        assert (rep["process_index"], rep["process_count"], rep["device_count"], rep["local_device_count"]) \
            == (pid, count, 8, local), f"unexpected topology {rep}\n{tails}"
        assert rep["final_step"] == STEPS, tails
        assert rep["checkpoints"] == [str(STEPS)], f"checkpoints {rep['checkpoints']}\n{tails}"
        # FSDP really splits the matrices over the 8 devices (biases and norms stay replicated).
        assert rep["sharded"] == ["net.0.weight", "net.3.weight", "net.5.weight"], rep["sharded"]

    # The collectively saved checkpoint holds both processes' shards and was committed.
    state_dir = tmp_path / "multi" / "checkpoints" / str(STEPS) / "state"
    assert {p.name for p in state_dir.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}, \
        sorted(p.name for p in state_dir.iterdir())
    assert (tmp_path / "single" / "metrics.jsonl").stat().st_size > 0
    assert (tmp_path / "multi" / "metrics.jsonl").stat().st_size > 0

    ref = _losses_by_step(single, "single", 1, tails)
    got0 = _losses_by_step(p0, "process0", 2, tails)
    got1 = _losses_by_step(p1, "process1", 2, tails)
    assert all(math.isfinite(v) for v in ref + got0 + got1), (ref, got0, got1)
    assert ref[-1] < ref[0], f"the reference run did not learn: {ref}"
    assert got0 == got1, f"the two processes disagree:\n{got0}\n{got1}"
    err = rel_err(np.array(got0), np.array(ref))
    print(f"multi-host vs single-process losses: max relative difference {err:.3g}")
    assert err <= TOL, f"losses differ by {err:.3g} (relative) > {TOL}:\nmulti  {got0}\nsingle {ref}\n{tails}"

    # Final parameters (gathered from both processes) match each other and the reference.
    final = [np.load(r["params_path"]) for r in (single, p0, p1)]
    # bridge.export on both processes: one file, written by process 0, present when each returned,
    # holding exactly the gathered parameters.
    assert p0["exported"] == p1["exported"] == str(tmp_path / "multi" / "final.safetensors"), tails
    assert p0["exported_exists"] and p1["exported_exists"], tails
    assert single["state_dict_matches"] and p0["state_dict_matches"] and p1["state_dict_matches"], tails
    exported = safetensors.numpy.load_file(p0["exported"])
    assert set(exported) == set(final[1].files), sorted(exported)
    for name in final[1].files:
        np.testing.assert_array_equal(exported[name], final[1][name], err_msg=name)
    assert set(final[0].files) == set(final[1].files) == set(final[2].files)
    for name in final[0].files:
        np.testing.assert_array_equal(final[1][name], final[2][name], err_msg=name)
        perr = rel_err(final[1][name], final[0][name])
        assert perr <= TOL, f"{name}: final params differ by {perr:.3g} (relative) from the single-process run"
