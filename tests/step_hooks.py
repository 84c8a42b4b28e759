"""Step hooks the training tests install (`run_training(step_hook="tests/step_hooks.py:NAME")`).

They run inside Ray Train workers after every step; the training loop knows nothing of them.
"""

import os
import time


def fail_once_after_step_7(step: int, rank: int, world: int, run_dir: str | None) -> None:
    _fail_once(7, step, rank, world, run_dir)


def _fail_once(fail_at: int, step: int, rank: int, world: int, run_dir: str | None) -> None:
    """The last rank dies abruptly after step `fail_at`, once per run."""
    if step != fail_at or rank != world - 1 or not run_dir:
        return
    marker = os.path.join(run_dir, "failed-once")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    # Ray Train's controller learns of reported checkpoints by polling the workers (every
    # 2 s by default): give it time to register the last one, so the test knows which
    # checkpoint the run must resume from.
    time.sleep(5)
    os._exit(1)
