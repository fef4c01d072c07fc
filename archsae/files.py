"""Writing files and folders whole or not at all: build under a temporary sibling name, then
rename into place. A crash leaves at most a `.NAME.tmp-*` sibling, never a half-written file."""

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

TEMPORARY = ".{name}.tmp-"


def temporary_sibling(path: Path) -> Path:
    path = Path(path)
    return path.with_name(TEMPORARY.format(name=path.name) + uuid.uuid4().hex[:8])


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

