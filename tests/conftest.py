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


@pytest.fixture
def sigterm_after_update():
    """sigterm_after_update(k) sends the process a SIGTERM at the end of the optimizer update that makes step k + 1
    (the (k + 1)-th `Optimizer.step` call of the test), where a stop must not leave the update half-recorded; it
    returns a function that disarms it, for the --resume that follows (the fixture disarms it at the end too)."""
    import signal
    from torch.optim.optimizer import register_optimizer_step_post_hook
    handles = []

    def arm(k):
        calls = []

        def hook(opt, args, kwargs):
            calls.append(1)
            if len(calls) == k + 1:
                signal.raise_signal(signal.SIGTERM)
        handles.append(register_optimizer_step_post_hook(hook))
        return handles[-1].remove
    yield arm
    for h in handles:
        h.remove()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The folder of a finished tiny training run per package (test_bad_input.TINY), trained on first use and
    shared by the test modules that read checkpoints."""
    from test_bad_input import Trained
    return Trained(tmp_path_factory.mktemp("trained"))
