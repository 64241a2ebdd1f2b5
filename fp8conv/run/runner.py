"""Run jobs in forked worker processes, and notice at once when one of them dies.

multiprocessing.Pool waits forever for the result of a worker that the out-of-memory killer,
a stray SIGTERM or a segfault took away. Here the parent waits on every worker's pipe *and*
its process sentinel together: a worker that exits without answering is seen within one wait,
the others are stopped, and WorkerDied names the signal or exit status.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from ..errors import WorkerDied

STOP_GRACE_S = 2.0
# Signals that stop a worker (the parent sends SIGTERM in _stop). A forked worker would inherit the
# parent's Python handlers for them (the CLI turns them into an exception that cleans up the output),
# so the parent blocks them across the fork and the worker restores their default action before
# unblocking them: a worker signalled while it still starts dies by the signal, printing nothing.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this worker when its parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the closed pipe stops it instead
        pass


def _worker(conn: Connection, func: Callable[[Any], Any], initializer: Callable[[], None] | None,
            parent_pid: int | None = None, inherited: Sequence[Connection] = ()) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)  # the parent died before PDEATHSIG was armed: nobody would ever signal us
    for other in inherited:
        other.close()  # the parent's ends (ours and earlier workers'): a dead parent then reads as EOF
    if initializer is not None:
        initializer()
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if item is None:
            return
        index, arg = item
        try:
            reply = ("ok", index, func(arg))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = ("error", index, exc)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as exc:  # the exception itself does not pickle: send its text
            conn.send(("error", index, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({exc})")))


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGKILL' / 'exited with status 3' for a Process.exitcode."""
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the out-of-memory killer sends it; try fewer --workers)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {exitcode}"


def run_parallel(func: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 on_result: Callable[[int, Any], None], initializer: Callable[[], None] | None = None) -> None:
    """Call func(item) in up to `workers` forked processes; on_result(index, value) in the parent,
    in completion order. A worker's exception is re-raised here; a worker that dies raises
    WorkerDied. Any exit (error, signal, KeyboardInterrupt) stops every worker before returning."""
    ctx = multiprocessing.get_context("fork")
    procs: dict[Connection, multiprocessing.process.BaseProcess] = {}
    done = False
    try:
        for _ in range(min(workers, len(items))):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, func, initializer, os.getpid(), [parent, *procs]),
                               daemon=True)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                proc.start()
            except OSError as exc:  # EAGAIN / ENOMEM from fork: not the output's fault
                child.close()
                parent.close()
                raise WorkerDied(f"cannot start a worker process ({exc.strerror or exc}); try fewer --workers") from None
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child.close()
            procs[parent] = proc
        pending = iter(enumerate(items))
        busy: set[Connection] = set()
        for conn in procs:
            _dispatch(conn, procs[conn], pending, busy)
        while busy:
            sentinels = {proc.sentinel: conn for conn, proc in procs.items()}
            ready = wait(list(busy) + list(sentinels))
            for conn in [r for r in ready if r in busy]:
                try:
                    status, index, value = conn.recv()
                except (EOFError, OSError):
                    raise _died(procs[conn]) from None
                busy.discard(conn)
                if status == "error":
                    raise value
                on_result(index, value)
                _dispatch(conn, procs[conn], pending, busy)
            for sentinel in [r for r in ready if r in sentinels]:
                conn = sentinels[sentinel]
                if not conn.poll():  # an answer still in the pipe is read first, on the next wait
                    raise _died(procs[conn])
        for conn in procs:
            conn.send(None)
        done = True
    finally:
        _stop(procs, graceful=done)


def _died(proc) -> WorkerDied:
    proc.join(STOP_GRACE_S)
    return WorkerDied(f"a worker process (pid {proc.pid}) {describe_exit(proc.exitcode)}; partial output removed")


def _dispatch(conn: Connection, proc, pending, busy: set[Connection]) -> None:
    item = next(pending, None)
    if item is None:
        return
    try:
        conn.send(item)
    except OSError:
        raise _died(proc) from None
    busy.add(conn)


def _stop(procs: dict, graceful: bool) -> None:
    """Workers told to stop exit by themselves; otherwise SIGTERM, then SIGKILL after a grace period."""
    for proc in procs.values():
        if graceful:
            proc.join(STOP_GRACE_S)
        if proc.exitcode is None:
            proc.terminate()
    for proc in procs.values():
        proc.join(STOP_GRACE_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    for conn in procs:
        conn.close()
