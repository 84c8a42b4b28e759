"""Faults the stage-1 tests inject into Dask workers (registered as worker plugins, so a
restarted worker gets them again); the pipeline knows nothing of them."""

import time

from distributed.diagnostics.plugin import WorkerPlugin


class DecoderHangsOn(WorkerPlugin):
    """The worker's decoder never returns on files whose name ends with `suffix`, as a
    decoder looping forever on a crafted file would."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def setup(self, worker):
        from cleaning import steps

        original, suffix = steps.Decode.check, self.suffix

        def check(step, face):
            if face.raw.source.endswith(suffix):
                while True:
                    time.sleep(1)
            return original(step, face)

        steps.Decode.check = check
