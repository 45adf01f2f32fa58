"""One process at a time in a folder: a training run's --out, a sweep's folder.

Two runs started into one --out (one by accident) would append to the same train_log.jsonl and overwrite each
other's checkpoints. The first takes an exclusive POSIX lock (flock) on FOLDER/.lock and writes its process id
there; a second is refused with one line naming that process. The kernel drops the lock when its process ends,
even killed with SIGKILL, so a stale lock cannot outlive its run (the .lock file itself stays; it means nothing
while unlocked)."""
import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def folder_lock(folder, what, hint=""):
    """Hold the lock on `folder` (created if needed) for the `with` block; ValueError naming the holder's process
    if another `what` holds it. A folder this call created that holds nothing but the lock afterwards (a run
    rejected before it wrote anything) is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")             # "a+": not truncated, so the holder's process id stays readable
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{folder} is in use by another {what} (process {holder}){hint}") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()
        if created and [p.name for p in folder.iterdir()] == [".lock"]:
            (folder / ".lock").unlink()
            folder.rmdir()
