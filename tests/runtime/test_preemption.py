"""Preemption's signal flag: a signal is acted on once, never lost, whenever it arrives."""

import os
import signal
import threading
import time

from dsfm.runtime.checkpoint import Preemption


def test_every_signal_is_seen_even_when_it_lands_inside_a_check():
    """A background thread signals this process 60 times while the main thread checks in a
    tight loop (as often as the trainer would with signal_check_every=1). Every signal must
    come out of exactly one check: one that arrives while a check is running belongs to the
    next check, it must not be wiped by this one. Each signal is sent once the one before it
    has been seen, so that two are never pending together (the kernel merges those: spaced
    10 ms apart instead, two landed before one check on a loaded machine); one a check wiped
    is never seen, and the sender gives up on it after 20 s."""
    pre = Preemption()
    sent, seen, lost = 60, 0, []
    done = threading.Event()

    def sender():
        for k in range(sent):
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while seen <= k and time.monotonic() < deadline:
                time.sleep(0.001)
            if seen <= k:               # wiped: no later check will see it
                lost.append(k)
                break
        done.set()

    try:
        thread = threading.Thread(target=sender)
        thread.start()
        while not done.is_set():
            seen += pre.requested() == 1
        thread.join()
        seen += pre.requested() == 1
        assert pre.requested() == 0
    finally:
        pre.restore()
    assert (seen, lost) == (sent, [])


def test_terminate_outranks_checkpoint_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    pre = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert pre.requested() == 2 and pre.requested() == 0
    finally:
        pre.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_held_sigterm_is_noted_and_ignored_and_sigusr1_is_restored():
    """restore(hold_sigterm=True), for a rank stopping on an error: SIGTERM (a launcher ending
    the ranks) no longer ends the process before it says why; SIGUSR1's handler is back."""
    term, usr1 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    pre = Preemption()
    try:
        pre.restore(hold_sigterm=True)
        assert signal.getsignal(signal.SIGUSR1) is usr1
        os.kill(os.getpid(), signal.SIGTERM)         # would end pytest with the default
        time.sleep(0.01)
        assert pre.requested() == 2
    finally:
        pre.restore()
    assert signal.getsignal(signal.SIGTERM) is term
