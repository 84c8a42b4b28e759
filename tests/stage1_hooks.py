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


class StepRaisesOn(WorkerPlugin):
    """A step raises on files whose name ends with `suffix`, and the detector on images
    `width` pixels wide (as a bug triggered by one odd record would)."""

    def __init__(self, suffix: str, width: int):
        self.suffix, self.width = suffix, width

    def setup(self, worker):
        from cleaning import stage1, steps

        original_check, suffix = steps.Decode.check, self.suffix
        original_copy, width = stage1.bounded_copy, self.width

        def check(step, face):
            if face.raw.source.endswith(suffix):
                raise ValueError("a bug this record triggers")
            return original_check(step, face)

        def bounded_copy(image, max_side):
            if image.shape[1] == width:
                raise IndexError("a detector bug this image triggers")
            return original_copy(image, max_side)

        steps.Decode.check = check
        stage1.bounded_copy = bounded_copy


class NannyGivesUpOn(WorkerPlugin):
    """The first time a worker decodes a file whose name ends with `suffix`, it closes with its
    nanny, so nothing restarts it (as when a worker dies while its nanny is still restarting
    it). `marker` is a file that says it happened: the next worker decodes the file normally."""

    def __init__(self, suffix: str, marker: str):
        self.suffix, self.marker = suffix, marker

    def setup(self, worker):
        import os

        from cleaning import steps

        original, suffix, marker = steps.Decode.check, self.suffix, self.marker

        def check(step, face):
            if face.raw.source.endswith(suffix) and not os.path.exists(marker):
                open(marker, "w").close()
                worker.loop.add_callback(worker.close, nanny=True, reason="test: the nanny gives up")
                while True:
                    time.sleep(1)
            return original(step, face)

        steps.Decode.check = check
