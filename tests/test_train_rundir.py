"""Run-directory safety (mmfm.train.rundir): lock, fresh-vs-resume rules, lineage, metrics."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mmfm.errors import MmfmError
from mmfm.train.rundir import (
    LINEAGE_FILE,
    LOCK_FILE,
    REPLAYED_METRICS,
    Lineage,
    RunDirError,
    RunLock,
    checkpoint_name,
    prepare_run_dir,
    truncate_metrics,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this fast)


def write_ckpt(root, step, lineage=None):
    (root / checkpoint_name(step)).mkdir(parents=True)
    if lineage is not None:
        lineage.record(checkpoint_name(step))


def test_second_lock_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on this host") as info:
            RunLock(tmp_path).acquire()
        assert isinstance(info.value, MmfmError)
    assert not (tmp_path / LOCK_FILE).exists()  # released
    with RunLock(tmp_path):  # and can be taken again
        pass


def test_lock_of_a_live_process_in_another_interpreter_is_refused(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid}))
        with pytest.raises(RunDirError, match=f"pid {child.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_from_another_host_is_refused_with_the_path(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 4242}))
    with pytest.raises(RunDirError, match=r"pid 4242 on host node-17; if that run is gone, remove"):
        RunLock(tmp_path).acquire()


def test_fresh_run_over_existing_run_is_refused_unless_overwrite(tmp_path):
    assert prepare_run_dir(tmp_path, resume=False) is None  # empty folder: fresh
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    write_ckpt(tmp_path / "checkpoints", 10)
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoints, metrics.jsonl\)"):
        prepare_run_dir(tmp_path, resume=False)
    assert prepare_run_dir(tmp_path, resume=False, overwrite=True) is None
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_resume_without_checkpoint_is_an_error_unless_fresh_is_allowed(tmp_path):
    with pytest.raises(RunDirError, match="holds no checkpoint to resume"):
        prepare_run_dir(tmp_path, resume=True)
    assert prepare_run_dir(tmp_path, resume=True, fresh_if_no_checkpoint=True) is None
    with pytest.raises(RunDirError, match="contradict"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)


def test_resume_follows_lineage_not_the_newest_name(tmp_path):
    # The issue: steps 5, 10, 12 written; --resume-from step_10; crash after step_11... and
    # --resume picked step_12 of the abandoned lineage because it sorts last.
    root = tmp_path / "checkpoints"
    lin = Lineage.load(root)
    for step in (5, 10, 12):
        write_ckpt(root, step, lin)
    assert prepare_run_dir(tmp_path, resume=True) == "step_00000012"
    moved = Lineage.load(root).resume_from("step_00000010")
    assert moved == ["step_00000012"]
    assert (root / "abandoned" / "step_00000012").is_dir()  # kept aside, not deleted
    lin = Lineage.load(root)
    assert "step_00000012" in lin.abandoned and "step_00000010" in lin.abandoned["step_00000012"]
    write_ckpt(root, 11, lin)
    assert lin.parents["step_00000011"] == "step_00000010"
    assert prepare_run_dir(tmp_path, resume=True) == "step_00000011"
    assert Lineage.load(root).chain() == ["step_00000011", "step_00000010", "step_00000005"]


def test_resume_from_a_branch_point_when_the_abandoned_name_is_reused(tmp_path):
    root = tmp_path / "checkpoints"
    lin = Lineage.load(root)
    for step in (5, 10, 15):
        write_ckpt(root, step, lin)
    lin.resume_from("step_00000005")
    write_ckpt(root, 10, lin)  # the new lineage writes step_10 again
    assert Lineage.load(root).chain() == ["step_00000010", "step_00000005"]
    assert sorted(os.listdir(root / "abandoned")) == ["step_00000010", "step_00000015"]
    Lineage.load(root).resume_from("step_00000005")  # abandons the new step_10 too
    assert sorted(os.listdir(root / "abandoned")) == ["step_00000010", "step_00000010.2",
                                                      "step_00000015"]
    assert "step_00000010.2" in Lineage.load(root).abandoned


def test_resume_point_skips_a_missing_head(tmp_path):
    root = tmp_path / "checkpoints"
    lin = Lineage.load(root)
    for step in (5, 10):
        write_ckpt(root, step, lin)
    os.rmdir(root / "step_00000010")  # e.g. deleted by hand
    assert lin.resume_point() == "step_00000005"


def test_pruned_checkpoint_is_forgotten_and_chain_stays_connected(tmp_path):
    root = tmp_path / "checkpoints"
    lin = Lineage.load(root)
    for step in (5, 10, 15):
        write_ckpt(root, step, lin)
    lin.forget("step_00000010")
    assert Lineage.load(root).chain() == ["step_00000015", "step_00000005"]


def test_run_from_before_lineage_resumes_by_step_order(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 20, 3):
        write_ckpt(root, step)
    (root / ".tmp_step_00000200").mkdir()  # a write interrupted by a crash: never resumed
    assert Lineage.load(root).resume_point() == "step_00000100"


def test_corrupt_lineage_file_is_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / LINEAGE_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match=r"lineage.json is corrupt"):
        Lineage.load(root)


def test_unknown_resume_from_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="--resume-from step_00000007: no such checkpoint"):
        Lineage.load(tmp_path / "checkpoints").resume_from("step_00000007")


def test_metrics_after_resume_hold_each_step_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 5.0 - s / 10}) for s in range(1, 13)]
    metrics.write_text("\n".join(lines) + '\n{"step": 13, "train/lo')  # cut by a crash
    assert truncate_metrics(metrics, resume_step=10) == 2
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 11))
    replayed = [json.loads(line) for line in (tmp_path / REPLAYED_METRICS).read_text().splitlines()]
    assert [(r["step"], r["replayed_after"]) for r in replayed] == [(11, 10), (12, 10)]
    assert truncate_metrics(tmp_path / "none.jsonl", 3) == 0
