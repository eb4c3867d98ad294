"""Test-only fault injection for the crash-safety tests; production code knows nothing of it.

conftest.py puts this folder on PYTHONPATH, so every Python subprocess a test starts imports this file as
`sitecustomize`. With GPT_TINYSTORIES_TEST_KILL_IN_SAVE="N:STAGE" set, it wraps checkpoint functions so that
the process SIGKILLs itself at STAGE of its N-th `checkpoint.save()`:

- weights: the weights file is written, nothing else;
- meta: meta.json is written too, but nothing is fsynced or renamed yet;
- replace: the checkpoint being replaced was moved aside, the new one is not yet renamed into place.

That is exactly where a crash would hurt most, and a real SIGKILL, not an exception: no cleanup code runs.
Without the variable this file does nothing (and imports nothing).
"""

import os
import signal

KILL_IN_SAVE_ENV = "GPT_TINYSTORIES_TEST_KILL_IN_SAVE"


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


if os.environ.get(KILL_IN_SAVE_ENV):
    KillInSave(os.environ[KILL_IN_SAVE_ENV]).install()
