"""The Ray backend's start keeps the run's own stop handling (real local Ray)."""

import contextlib
import signal

from launch.config import TrainConfig
from launch.ray_backend import RayBackend


def test_ray_init_does_not_take_sigterm_from_the_run(tmp_path):
    # ray.init installs a SIGTERM handler that calls sys.exit: a stop in the rest of the start
    # (the learner's first weights can take minutes) then skipped the run's clean stop
    def ours(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with contextlib.ExitStack() as resources:
            RayBackend(TrainConfig(), tmp_path)._start_ray(resources)
            assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
