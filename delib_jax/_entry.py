"""Command-line entry points that answer Ctrl-C with one line and exit status 130 at any moment, start-up included.

The commands import JAX and friends for a second or more, at start-up and lazily inside ``main``. A KeyboardInterrupt
raised in the middle of an import printed a traceback from some library, or crashed the interpreter (SIGSEGV) in a
half-initialised extension. Here the SIGINT handler, installed before anything heavy is imported (this module uses
only the standard library), leaves at once with one line when the interrupt arrives during an import, and raises
KeyboardInterrupt as usual otherwise, for the commands' own handling (which says how to resume).
``python -m train.cub`` and friends, and the ``delib`` console script, start through `run`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable

_ON_EXIT: dict[int, Callable[[], None]] = {}  # id(owner) -> cleanup, run before leaving with os._exit


def on_exit(owner: object, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` if the process leaves with `exit_process` (130) while ``owner`` (e.g. a process pool) lives;
    forgotten when ``owner`` is collected."""
    import weakref

    key = id(owner)
    _ON_EXIT[key] = cleanup
    weakref.finalize(owner, _ON_EXIT.pop, key, None)


def _release() -> None:
    """Before os._exit: run the registered cleanups (stop process pools), then unlink this process's named
    semaphores (those of the pools' queues), whose finalizers os._exit skips: otherwise the resource tracker warns
    "There appear to be N leaked semaphore objects" once the pools' workers have gone."""
    for cleanup in list(_ON_EXIT.values()):
        try:
            cleanup()
        except Exception:  # noqa: BLE001, S110 -- leaving anyway: the next cleanup still runs
            pass
    _ON_EXIT.clear()
    util, synchronize = sys.modules.get("multiprocessing.util"), sys.modules.get("multiprocessing.synchronize")
    if util is None or synchronize is None or not getattr(util, "_finalizer_registry", None):
        return
    for finalizer in list(util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup:
            try:
                finalizer()  # sem_unlink, and unregistered from the resource tracker
            except Exception:  # noqa: BLE001, S110 -- leaving anyway
                pass


def exit_process(status: int) -> None:
    """``sys.exit(status)`` for the command-line entry points, but after Ctrl-C (130) leave at once: the interpreter's
    shutdown can then crash (SIGSEGV, exit 139) in XLA work the interrupt cut short; all finished work is on disk.
    Process pools registered with `on_exit` are stopped and their semaphores released first."""
    if status == 130:
        _release()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _interrupted(name: str) -> int:
    print(f"\n{name}: interrupted", file=sys.stderr)
    return 130


def _importing(frame) -> bool:
    """Whether the main thread, stopped at ``frame``, is inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def run(target: str, *args, name: str) -> None:
    """Import ``target`` ('module:function'), call it with ``args`` and exit with its status (`exit_process`).

    Ctrl-C during an import (the start-up's or a later one) prints "NAME: interrupted" and leaves with 130 at once;
    elsewhere it raises KeyboardInterrupt for the function to handle (one that it leaves unhandled: the same line)."""

    def on_interrupt(signum, frame) -> None:  # noqa: ARG001 -- the signal handler's signature
        if _importing(frame):
            _interrupted(name)
            exit_process(130)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        module, function = target.split(":")
        status = getattr(importlib.import_module(module), function)(*args)
    except KeyboardInterrupt:
        status = _interrupted(name)
    exit_process(int(status or 0))


def delib() -> None:
    """The ``delib`` console script."""
    run("delib_jax.cli:main", name="delib")
