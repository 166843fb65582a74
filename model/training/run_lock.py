"""One trainer per model_dir: a running trainer holds model_dir/run.lock.

A second trainer on the same folder stops at once with one line naming the holder (host, pid,
start time) and writes nothing. A holder that died leaves its lock behind; it does not block the
next run:
  * on the holder's own machine (same host name and boot): the holder's pid is looked up, with
    its start time, so a pid reused by another process is not taken for the holder;
  * from another machine (a lost VM, a shared gs:// folder): the holder rewrites its heartbeat
    every HEARTBEAT_SECONDS; a lock whose heartbeat is older than STALE_SECONDS is dead. A lost
    VM therefore blocks its model_dir for at most STALE_SECONDS.
Object stores have no exclusive create: two trainers started within the same second on gs://
can both read "free"; each reads its lock back after writing it and the one that finds the
other's stops. On local disks an exclusive hard link decides (as O_EXCL would).
A lock is only ever written whole (a temporary file linked or renamed into place), so a lock file
that cannot be read (empty, cut short, garbage: a full disk under an older version, a bad copy)
is no live trainer's: it is taken over with one line naming it, like a dead holder's.

The same lock keeps two evaluations out of one output folder (hold_output: OUTPUT_DIR.lock beside
it), and evaluate.py reads a model_dir's lock, without touching it, to say that a run it
evaluates is still being trained (trainer_of).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time

import tensorflow as tf

from model import atomic
from model.errors import UserError
from model.model_dir import RunFolder

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _this_process() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid), "boot_id": _boot_id(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "heartbeat": time.time()}


def holder_alive(holder: dict, now: float | None = None) -> bool:
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        start = _process_start(int(holder["pid"]))
        if start or not os.path.exists("/proc"):
            return not holder.get("process_start") or start == holder["process_start"]
        try:
            os.kill(int(holder["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return (now or time.time()) - float(holder.get("heartbeat", 0)) < STALE_SECONDS


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


UNREADABLE: dict = {}  # (compared by identity) a lock file that exists but holds no holder (empty, cut short, garbage)


def _read(path: str) -> dict | None:
    """The holder the lock names; None if there is no lock; UNREADABLE if it cannot be parsed.
    Locks are written whole (_create), so an unreadable one is no live trainer's: a full disk at
    an older version's start, a cut copy, a hand edit."""
    try:
        with tf.io.gfile.GFile(path) as f:
            holder = json.loads(f.read())
    except tf.errors.NotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, tf.errors.OpError):
        return UNREADABLE
    return holder if isinstance(holder, dict) and "pid" in holder else UNREADABLE


def _create(path: str, me: dict) -> bool:
    """Writes the lock whole; False if another trainer's lock stands there now. Locally the
    content goes to a temporary file first, which is then hard-linked to the lock's name (link
    fails if the name exists: as exclusive as O_EXCL), so a full disk fails before any lock exists
    and leaves none; the temporary file is always removed."""
    text = json.dumps(me)
    if "://" not in path:
        partial = f"{atomic.partial_path(path)}.{me['pid']}"
        try:
            with open(partial, "w") as f:
                f.write(text)
            try:
                os.link(partial, path)
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                _create_exclusive(path, text)  # a filesystem without hard links
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)
        return True
    atomic.write_text(path, text)
    holder = _read(path) or {}
    return holder.get("pid") == me["pid"] and holder.get("host") == me["host"]


def _create_exclusive(path: str, text: str) -> None:
    """O_EXCL, and the lock removed again if its content cannot be written."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        os.remove(path)
        raise


def _take_over_line(path: str, holder: dict) -> str:
    if holder is UNREADABLE:
        return f"Taking over {path}: it cannot be read (empty or damaged), so no live trainer holds it"
    return f"Taking over {path}: its holder ({describe(holder)}) is no longer running"


@contextlib.contextmanager
def hold(model_dir: str, log=print, *, lock_file: str = "", who: str = "trainer", flag: str = "--model_dir"):
    """Holds model_dir while the block runs; UserError (one line) if a live trainer holds it.
    lock_file, who, flag: the same lock for another folder and holder (hold_output)."""
    path = lock_file or RunFolder(model_dir).lock_file
    me = _this_process()
    with atomic.write_errors_named(path):
        for _ in range(3):  # a stale lock removed, then a race with another starter: bounded
            holder = _read(path)
            if holder and holder_alive(holder):
                raise UserError(f"{model_dir} is in use by another {who} ({describe(holder)}); wait for it "
                                f"to finish or stop it, or use another {flag}")
            if holder is not None:
                log(_take_over_line(path, holder), flush=True)
                tf.io.gfile.remove(path)
            if _create(path, me):
                break
        else:
            raise UserError(f"{model_dir}: another {who} is starting on it at the same time")
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat only makes the lock look older
                atomic.write_text(path, json.dumps({**me, "heartbeat": time.time()}))

    heart = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    heart.start()
    try:
        yield
    finally:
        stop.set()
        heart.join()
        with contextlib.suppress(Exception):
            if (_read(path) or {}).get("pid") == me["pid"]:
                tf.io.gfile.remove(path)


def trainer_of(model_dir: str) -> str | None:
    """The live trainer holding model_dir now (describe()), or None: read-only, the lock is not
    touched (evaluate.py asks, model/commands/evaluate.py)."""
    holder = _read(RunFolder(model_dir).lock_file)
    return describe(holder) if holder and holder_alive(holder) else None


def output_lock_file(output_dir: str) -> str:
    """An evaluation's lock: OUTPUT_DIR.lock beside its output folder (which is moved into place
    whole at the end, so it cannot hold its own lock)."""
    return output_dir.rstrip("/") + ".lock"


def hold_output(output_dir: str, log=print):
    """One evaluation at a time writes output_dir: the trainer's lock, beside the folder."""
    tf.io.gfile.makedirs(os.path.dirname(output_dir.rstrip("/")) or ".")
    return hold(output_dir, log, lock_file=output_lock_file(output_dir), who="evaluation", flag="--output_dir")
