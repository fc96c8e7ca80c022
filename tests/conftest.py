import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import pytest  # noqa: E402


@pytest.fixture
def stop_at(monkeypatch):
    """stop_at(train, k) makes train.lr_at raise `exc` (a Ctrl-C by default, or a crash) when step k begins, and
    returns a function that undoes it, for the --resume that follows."""
    def arm(module, when, exc=KeyboardInterrupt):
        real = module.lr_at

        def stopping(step, *args):
            if step == when:
                raise exc
            return real(step, *args)
        monkeypatch.setattr(module, "lr_at", stopping)
        return lambda: monkeypatch.setattr(module, "lr_at", real)
    return arm


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The folder of a finished tiny training run per package (test_bad_input.TINY), trained on first use and
    shared by the test modules that read checkpoints."""
    from test_bad_input import Trained
    return Trained(tmp_path_factory.mktemp("trained"))
