"""Temporary folders moesim writes into before an atomic rename (:mod:`moesim.fileio`): each named after its
target and owner, marked with its process id and host, and removed by the next run when that process was killed.

Every temporary folder is named ``.NAME.moesim-PID-XXXXXXXX.tmp`` and holds :data:`TEMP_MARKER`
(:func:`temporary_folder`). A process killed outright (SIGKILL, power loss) cannot clean up; the next check of an
output path removes the temporary folders beside it and inside it whose marker names a process of this host
that is gone (:func:`remove_stale_temporaries`). Nothing without the marker, nothing of a live process and
nothing of another host is ever removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path


def head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of ``path`` (b"" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


TEMP_MARKER = "moesim-temporary.json"  # inside every temporary folder moesim makes: whose it is
_TEMP_FORMAT = "moesim.temporary/1"
_TEMP_NAME = re.compile(r"\.(?:.+\.)?moesim-([0-9]+)-[A-Za-z0-9_]+\.tmp")  # .[NAME.]moesim-PID-XXXXXXXX.tmp


def temporary_folder(parent: Path, target: str) -> Path:
    """A new hidden folder in ``parent`` for work on ``target`` (a name in ``parent``, or ``"."`` for ``parent``
    itself), named ``.TARGET.moesim-PID-XXXXXXXX.tmp`` (``.moesim-PID-XXXXXXXX.tmp`` for ``"."``) and holding
    :data:`TEMP_MARKER`: this process's id and host (with its PID namespace). What is written goes into
    sub-folders or files beside the marker; :func:`remove_temporary` removes it all. When the process is killed
    (SIGKILL, power loss), the next check of an output path beside it or inside it removes it
    (:func:`remove_stale_temporaries`)."""
    stem = "" if target == "." else f".{target[:60]}"
    path = Path(tempfile.mkdtemp(prefix=f"{stem}.moesim-{os.getpid()}-", suffix=".tmp", dir=parent))
    try:
        info = {"format": _TEMP_FORMAT, "pid": os.getpid(), "host": _process_space(), "target": target}
        (path / TEMP_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def remove_temporary(path: Path) -> None:
    """Remove a folder made by :func:`temporary_folder` and all it holds, the marker last (so that a removal
    cut short leaves a folder that is still recognised)."""
    for entry in path.iterdir():
        if entry.name != TEMP_MARKER:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (path / TEMP_MARKER).unlink(missing_ok=True)
    path.rmdir()


def _process_space() -> str:
    """Where this process's id means something: the host name, and on Linux the PID namespace (a container on
    the same host numbers its processes apart)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run (unknown counts as running)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only asked
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (permission denied): alive
        return True
    return True


def stale_temporary(entry: Path) -> bool:
    """Whether ``entry`` is a folder :func:`temporary_folder` made for a process of this host that is gone.

    All of these must hold: the name has the pattern, it is a folder (not a link) holding the marker (a regular
    file) whose format, process id (the one in the name) and host match, and no process of that id runs. A
    folder that holds the older outputs set aside during a swap (``old``) is stale only while its target
    exists: otherwise those are the only copy. Anything else - someone else's folder, a live process's, one
    from another host - is not stale, and is never removed."""
    match = _TEMP_NAME.fullmatch(entry.name)
    marker = entry / TEMP_MARKER
    if match is None or entry.is_symlink() or not entry.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        info = json.loads(head(marker, 4096))  # a marker is a line: anything longer is not one
    except ValueError:
        return False
    pid = int(match.group(1)[:12])
    if not isinstance(info, dict) or info.get("format") != _TEMP_FORMAT or info.get("pid") != pid \
            or not 1 <= pid < 2**31 or info.get("host") != _process_space() or _process_alive(pid):
        return False
    target = info.get("target")
    if not isinstance(target, str) or not (target == "." or (target != ".." and Path(target).name == target)):
        return False  # "." (the folder holding it) or one name beside it
    holder = entry.parent if target == "." else entry.parent / target
    return not (entry / "old").is_dir() or os.path.lexists(holder)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the entries of ``folder`` that :func:`stale_temporary` recognises (left by a moesim process that
    was killed); returns those removed. What cannot be removed or read is left as it is."""
    try:
        entries = [e for e in folder.iterdir() if _TEMP_NAME.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    for entry in sorted(entries):
        if stale_temporary(entry):
            try:
                remove_temporary(entry)
            except OSError:
                continue
            removed.append(entry)
    return removed
