"""Multi-host batches that the processes must agree on (two CPU processes, 4 devices each, gloo): every process
takes or skips each batch together and stops together, rows are never dropped silently, and a mesh that would
replicate the batch across processes is refused at setup. The loss is the mean row id of the global batch, so
the logged losses say exactly which rows each step trained on (see multihost_batches_worker)."""
from __future__ import annotations

import json
import time

import pytest

from tests.trainers.test_multihost import Worker, _free_port, _gloo_available

TIMEOUT_S = 150


def _reports(tmp_path) -> tuple[list[dict], str]:
    port = _free_port()
    workers = [Worker(f"process{i}", ["--process-id", str(i), "--port", str(port), "--run-dir", str(tmp_path)],
                      tmp_path, module="tests.trainers.multihost_batches_worker", timeout_s=TIMEOUT_S)
               for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    codes = [w.wait(deadline) for w in workers]
    tails = "\n".join(w.tail() for w in workers)
    reports = [{r["scenario"]: r for r in map(json.loads, (line for line in w.stdout_path.read_text().splitlines()
                                                            if line.startswith("{")))} for w in workers]
    assert codes == [0, 0], f"exit codes {codes} (None: killed after {TIMEOUT_S} s)\n{reports}\n{tails}"
    return reports, tails


def test_processes_agree_on_every_batch(tmp_path):
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    (p0, p1), tails = _reports(tmp_path)

    # tensor=8 over 2 processes replicates the batch across them: refused at setup on both, naming the mesh
    for rep in (p0, p1):
        assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 8} over 2 processes" in rep["tensor"].get("error", ""), \
            f"{rep['tensor']}\n{tails}"

    # batch 1 has 4 rows on process 0 and 3 on process 1: both skip it (losses = the batch ids trained on)
    for rep in (p0["unequal"], p1["unequal"]):
        assert (rep["final_step"], rep["data_position"]) == (3, 4), rep
        assert any("different numbers of rows ([4, 3] by process" in w for w in rep["warnings"]), rep
    assert p0["unequal"]["losses"] == [0.0, 2.0, 3.0], p0["unequal"]

    # global batches of 16, 17, 16 rows split by local_rows: no row lost; the 17-row one is skipped on both
    # processes (as one process skips it: 17 rows do not divide over 8 data shards); the others use all 16 rows
    for rep in (p0["odd_global"], p1["odd_global"]):
        assert (rep["final_step"], rep["data_position"]) == (2, 3), rep
        assert any("different numbers of rows ([8, 9] by process; 17 in all)" in w for w in rep["warnings"]), rep
    assert p0["odd_global"]["losses"] == [7.5, 207.5], p0["odd_global"]

    # process 1's batches run out first: both stop after its two batches, with a warning naming it
    for rep in (p0["ended"], p1["ended"]):
        assert (rep["final_step"], rep["data_position"]) == (2, 2), rep
    assert p0["ended"]["losses"] == [0.0, 1.0], p0["ended"]
    assert any("process(es) [1] ran out" in w for w in p0["ended"]["warnings"]), p0["ended"]
