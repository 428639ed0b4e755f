"""Tests of lmcore.session's small parts on CPU: the NaN/inf watch, the training clock that
pauses for validation and checkpoints, the SIGTERM stop signal, and the finite-weights check.
(The session itself runs in every test of tests/test_train.py.)"""

from __future__ import annotations

import os
import signal
import time

import torch

from lmcore.checkpoint import TrainState
from lmcore.session import FiniteWatch, StopSignal, TrainClock, all_finite

CPU = torch.device("cpu")


def test_finite_watch_names_the_first_bad_step():
    watch = FiniteWatch(CPU)
    assert watch.push(1, torch.tensor(2.5)) is None
    assert watch.push(2, torch.tensor(float("nan"))) == 2
    assert watch.push(3, torch.tensor(float("inf"))) == 3
    assert watch.flush() is None  # on CPU every flag is read at once: nothing pending


def test_clock_runs_across_sessions_and_pauses():
    st = TrainState(train_ms=1000.0)  # an earlier session trained for one second
    clock = TrainClock(st, CPU)
    clock.start()
    time.sleep(0.05)
    with clock.paused():  # validation or checkpoint: not training time
        paused_at = st.train_ms
        assert 1050.0 <= paused_at < 1250.0, paused_at
        time.sleep(0.3)
    assert st.train_ms == paused_at
    time.sleep(0.05)
    clock.stop()
    # 1000 + 2 x 50 ms trained; counting the 300 ms pause would give >= 1400
    assert 1100.0 <= st.train_ms < 1350.0, st.train_ms


def test_sigterm_asks_for_a_stop_instead_of_killing():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_all_finite():
    model = torch.nn.Linear(3, 2)
    assert all_finite(model)
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert not all_finite(model)
