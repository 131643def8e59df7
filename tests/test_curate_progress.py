"""Progress of the data commands: the task-array bar reads the tasks' count files and ends
with a one-line summary; summary lines say docs, seconds and docs/s."""

from __future__ import annotations

import io
import re

from mmfm.data.curation.progress import (
    CountWriter,
    TaskArrayProgress,
    iter_progress,
    read_counts,
    summary_line,
)


def test_summary_line_says_docs_seconds_and_rate():
    assert summary_line("dedup", 1000, 2.0, "removed 3") == \
        "dedup: 1,000 docs in 2.0 s (500 docs/s); removed 3"
    assert summary_line("tokenizer", None, 1.25) == "tokenizer: 1.2 s"


def test_count_files_are_summed_and_missing_ones_count_zero(tmp_path):
    w = CountWriter(tmp_path / "00000.count")
    for _ in range(7):
        w.add()
    w.flush()
    (tmp_path / "00001.count").write_text("")  # a task that has just started
    paths = [tmp_path / f"{r:05d}.count" for r in range(3)]
    assert read_counts(paths) == 7


def test_task_array_bar_and_summary(tmp_path):
    out = io.StringIO()
    counts = [tmp_path / f"{r:05d}.count" for r in range(4)]
    finished: list[int] = []
    with TaskArrayProgress("stage 1", 4, done=lambda: len(finished),
                           docs=lambda: read_counts(counts), file=out, disable=False,
                           interval_s=0.01):
        for r, p in enumerate(counts):  # the "tasks", run while the bar polls
            p.write_text(str(250 * (r + 1)))
            finished.append(r)
    text = out.getvalue()
    assert "4/4" in text and "2,500 docs" in text  # tqdm's bar with the docs postfix
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"stage 1: 2,500 docs in \d+\.\d s \([\d,]+ docs/s\); 4/4 tasks", last)


def test_iter_progress_passes_items_through_and_shows_eta():
    out = io.StringIO()
    assert list(iter_progress(range(50), "shards", total=50, file=out, disable=False)) == \
        list(range(50))
    assert "50/50" in out.getvalue() and "doc/s" in out.getvalue()


def test_bars_are_off_when_stderr_is_not_a_terminal():
    out = io.StringIO()  # not a tty: tqdm's disable=None turns the bar off
    list(iter_progress(range(5), "x", total=5, file=out))
    assert out.getvalue() == ""


def _noop_task(data, rank: int = 0, world_size: int = 1) -> None:
    return None


def test_pool_executor_logs_go_to_the_log_file_not_the_terminal(tmp_path, capfd):
    from datatrove.executor import LocalPipelineExecutor

    from mmfm.data.curation.pipeline import executor_log

    ex = LocalPipelineExecutor(pipeline=[_noop_task], tasks=2, workers=2,
                               logging_dir=str(tmp_path / "logs"), start_method="fork")
    with executor_log(tmp_path / "executor.log"):
        ex.run()
    err = capfd.readouterr().err
    assert "All 2 tasks" not in err  # datatrove's merged stats, from the pool's driver
    assert "All 2 tasks" in (tmp_path / "executor.log").read_text()
