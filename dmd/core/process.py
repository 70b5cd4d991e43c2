"""Process lifetime: a process whose starter dies stops too, instead of running on as an orphan.

`dvc repro` runs a stage as `$SHELL -c "dmd <stage>"`; killed, it would leave the stage running, and the next
`dvc repro` would start a second one beside it. bash replaces itself with the command, so the stage's parent is
DVC; a plain `sh -c` (dash) stays in between, so the shell's parent is watched as well.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import psutil

SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5
_watching = False


def set_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send `signum` to this process when its parent exits (also usable as a Popen
    `preexec_fn`, for a child that cannot watch for itself). Elsewhere a no-op; `stop_with_parent` polls."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def stop_with_parent(signum: int = signal.SIGTERM) -> None:
    """Send this process `signum` when the process that started it exits (or, when that is a `sh -c` wrapper,
    the process that started the shell). Not when started under nohup (SIGHUP ignored: asked to outlive its
    parent) or already orphaned."""
    global _watching
    if _watching or signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return
    try:
        parent = psutil.Process(os.getppid())
        watched = [parent]
        if parent.pid != 1 and parent.name() in SHELLS and "-c" in parent.cmdline()[1:]:
            watched.append(parent.parent())
        watched = [p for p in watched if p is not None and p.pid != 1]
    except psutil.Error:
        return
    if not watched:
        return
    set_parent_death_signal(signum)
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signum)
    threading.Thread(target=_watch, args=(watched, signum), name="parent-watch", daemon=True).start()
    _watching = True


def _watch(watched: list[psutil.Process], signum: int) -> None:
    while all(_alive(p) for p in watched):
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signum)


def _alive(process: psutil.Process) -> bool:
    try:  # is_running() also tells a reused process id from the process it was
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# A watchdog process: it notes this process's descendants while this process runs and, when this process is gone
# (its end of the pipe closes, however it ended: kill -9 included), terminates those still running.
_REAPER = """
import os, select, sys
import psutil

parent, seen = psutil.Process(int(sys.argv[1])), {}
while True:
    readable = select.select([sys.stdin], [], [], float(sys.argv[2]))[0]
    if readable and not os.read(sys.stdin.fileno(), 1024):
        break
    try:
        seen.update({c.pid: c for c in parent.children(recursive=True) if c.pid != os.getpid()})
    except psutil.NoSuchProcess:
        break
for child in seen.values():
    try:
        if child.is_running():
            child.terminate()
    except psutil.Error:
        pass
"""
_reaper = None


def stop_children_with_this_process() -> None:
    """Have the processes this one starts (and theirs), such as the temporary Prefect server a flow run starts
    when PREFECT_API_URL is not set, terminated when this process exits, however it exits."""
    global _reaper
    if _reaper is None:
        import subprocess

        _reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(os.getpid()), str(POLL_SECONDS)], stdin=subprocess.PIPE
        )
