"""Exact resume: SIGKILL mid-run, resume, and the loss sequence equals an uninterrupted run bit for bit;
SIGTERM saves a checkpoint and exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


def _run(run_dir, sleep=0.0, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.trainers.resume_worker", str(run_dir), str(STEPS),
                             str(sleep)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # a resumed run drops the records of the steps after its checkpoint and logs them again: one per step
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    return {r["step"]: r["loss"] for r in rows}


def _wait_for(pred, proc, timeout=180):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _checkpoints(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _steps_logged(run_dir) -> int:
    p = Path(run_dir) / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full = _run(tmp_path / "full")
    interrupted = _run(tmp_path / "killed", sleep=0.25)
    run = tmp_path / "killed"
    _wait_for(lambda: 8 in _checkpoints(run) and _steps_logged(run) >= 10, interrupted)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    killed_at = _steps_logged(run)
    assert killed_at < STEPS, "the run finished before it was killed"
    resumed = _run(run)
    for p in (full, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    want, got = _losses(tmp_path / "full"), _losses(run)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in got] == [want[s] for s in got]          # bit for bit, every step


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "term"
    proc = _run(run, sleep=0.25)
    _wait_for(lambda: _steps_logged(run) >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    done = _steps_logged(run)
    assert done < STEPS and _checkpoints(run)[-1] == done            # saved exactly where it stopped
