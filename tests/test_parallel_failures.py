"""A rank that dies, or freezes, makes the other ranks exit with an error naming it, within
the configured timeout, instead of waiting in a collective.

Two cases over gloo with `rank_timeout_s=3`: rank 1 exits mid-run (its peer's collective fails
at once with gloo's "connection reset"; the trainer-style handler turns that into a
`RankFailure` naming rank 1), and rank 1 is frozen with SIGSTOP (sockets stay open, so rank 0
would block in all_reduce until the 300 s process-group timeout; the watchdog thread ends it
with exit code 3 and the message on stderr).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from mmfm.parallel.local import spawn

RANK_TIMEOUT_S = 3.0


def _collectives_until_peer_fails(err_dir: str, how: str) -> None:
    import torch
    import torch.distributed as dist

    from mmfm.parallel.watchdog import RankWatchdog, explain_failure

    rank = dist.get_rank()
    fd = os.open(os.path.join(err_dir, f"stderr{rank}"), os.O_WRONLY | os.O_CREAT)
    os.dup2(fd, 2)
    watchdog = RankWatchdog(rank, dist.get_world_size(), RANK_TIMEOUT_S).start()
    t = torch.ones(8)
    try:
        for step in range(10_000):
            if rank == 1 and step == 5:
                if how == "exit":
                    os._exit(7)
                os.kill(os.getpid(), signal.SIGSTOP)
            dist.all_reduce(t)
            time.sleep(0.01)
    except Exception as err:
        explain_failure(watchdog, rank, err)
        raise


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["exit", "stop"])
def test_dead_or_frozen_rank_is_named(tmp_path, how):
    started = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        spawn(_collectives_until_peer_fails, 2, (str(tmp_path), how), timeout_s=60,
              grace_s=3 * RANK_TIMEOUT_S)
    elapsed = time.monotonic() - started
    message = str(info.value)
    stderr0 = (tmp_path / "stderr0").read_text()
    if how == "exit":
        # rank 0 raised RankFailure naming rank 1 (reported through spawn's error file).
        assert "RankFailure" in message and "rank 1 (" in message, message[-2000:]
    else:
        assert "exit codes [3" in message, message  # rank 0 ended by the watchdog
        assert "rank 1 (" in stderr0 and "stopped responding" in stderr0, stderr0[-2000:]
    # Detection needs rank_timeout_s plus a heartbeat or two; process start-up adds ~10 s here.
    assert elapsed < 45, elapsed
