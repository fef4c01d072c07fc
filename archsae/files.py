"""Writing files and folders whole or not at all: build under a temporary sibling name, then
rename into place. A crash leaves at most a `.NAME.tmp-<host>-<pid>-<random>` sibling, never a
half-written file under its real name; `remove_stale_temporaries` clears the ones whose process
is gone, so reruns leave nothing behind."""

import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

HOST = socket.gethostname().replace("-", "_")


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary name beside `path`; stale temporaries there are removed first."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder) -> None:
    """Remove the temporaries in `folder` left by dead processes of this host (those of live
    processes, or of other hosts sharing the folder, are left alone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp-*"):
        _, _, tag = tmp.name.rpartition(".tmp-")
        host, _, rest = tag.partition("-")
        pid = rest.partition("-")[0]
        if host != HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def replaced_atomically(path, folder: bool = False):
    """Yield a temporary path beside `path`; on success it replaces `path` (a file, or an
    empty or missing folder, or a folder the caller has checked may go), else it is removed."""
    path = Path(path)
    tmp = temporary_sibling(path)
    if folder:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path, data) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
