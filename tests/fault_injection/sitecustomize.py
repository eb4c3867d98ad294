"""Test-only fault injection for the crash-safety tests; production code knows nothing of it.

conftest.py puts this folder on PYTHONPATH, so every Python subprocess a test starts imports this file as
`sitecustomize`. With GPT_TINYSTORIES_TEST_KILL_IN_SAVE="N:STAGE" set, it wraps checkpoint functions so that
the process SIGKILLs itself at STAGE of its N-th `checkpoint.save()`:

- weights: the weights file is written, nothing else;
- meta: meta.json is written too, but nothing is fsynced or renamed yet;
- replace: the checkpoint being replaced was moved aside, the new one is not yet renamed into place.

That is exactly where a crash would hurt most, and a real SIGKILL, not an exception: no cleanup code runs.
With GPT_TINYSTORIES_TEST_RECORD_RATES=FOLDER set, each rank of a training run records its learning rates
there (`RecordRates`). Without the variables this file does nothing (and imports nothing).
"""

import os
import signal
import time

KILL_IN_SAVE_ENV = "GPT_TINYSTORIES_TEST_KILL_IN_SAVE"
RECORD_RATES_ENV = "GPT_TINYSTORIES_TEST_RECORD_RATES"


class KillInSave:
    """Counts checkpoint saves and kills this process at the chosen stage of the chosen one."""

    def __init__(self, spec: str) -> None:
        count, self.stage = spec.split(":")
        self.count, self.saves, self.saving = int(count), 0, False

    def install(self) -> None:
        from gpt_tinystories import atomic, checkpoint

        self.save, self.write_weights = checkpoint.save, checkpoint._write_weights
        self.write_meta, self.move_aside = checkpoint._write_meta, atomic.move_aside
        checkpoint.save, checkpoint._write_weights = self.wrapped_save, self.wrapped_write_weights
        checkpoint._write_meta, atomic.move_aside = self.wrapped_write_meta, self.wrapped_move_aside

    def point(self, stage: str) -> None:
        if self.saving and self.saves == self.count and stage == self.stage:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrapped_save(self, *args, **kwargs):
        self.saves, self.saving = self.saves + 1, True
        try:
            return self.save(*args, **kwargs)
        finally:
            self.saving = False

    def wrapped_write_weights(self, *args, **kwargs) -> None:
        self.write_weights(*args, **kwargs)
        self.point("weights")

    def wrapped_write_meta(self, *args, **kwargs) -> None:
        self.write_meta(*args, **kwargs)
        self.point("meta")

    def wrapped_move_aside(self, *args, **kwargs):
        old = self.move_aside(*args, **kwargs)
        self.point("replace")
        return old


class RecordRates:
    """Each rank writes the learning rate of every step to FOLDER/rank-R.txt, and rank 1 sleeps 50 ms after each
    step, outside the step's timing: the ranks' own clocks then differ by far more than jitter."""

    def __init__(self, folder: str) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.file = open(os.path.join(folder, f"rank-{self.rank}.txt"), "a")  # noqa: SIM115 (open for the process)

    def install(self) -> None:
        from gpt_tinystories import trainer as train

        self.learning_rate, self.log_step = train.learning_rate, train._log_step
        train.learning_rate, train._log_step = self.wrapped_learning_rate, self.wrapped_log_step

    def wrapped_learning_rate(self, config, step, progress):
        lr = self.learning_rate(config, step, progress)
        self.file.write(f"{step} {lr!r}\n")
        self.file.flush()
        return lr

    def wrapped_log_step(self, *args, **kwargs):
        if self.rank == 1:
            time.sleep(0.05)
        return self.log_step(*args, **kwargs)


if os.environ.get(KILL_IN_SAVE_ENV):
    KillInSave(os.environ[KILL_IN_SAVE_ENV]).install()
if os.environ.get(RECORD_RATES_ENV):
    RecordRates(os.environ[RECORD_RATES_ENV]).install()
