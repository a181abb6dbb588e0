"""File helpers every layer shares: where outputs may go, atomic writes, safe file names, figures, JSON reads.

Writing follows four rules, whichever command writes:

- **Check before working.** :func:`check_output_file` and :func:`check_output_folder` look at an output path
  before any simulation or fit starts: a folder where a file is wanted (or the reverse), a path under a regular
  file, a place that cannot be written, or an existing file or folder that holds something moesim did not
  write is an :class:`~moesim.errors.InputError` naming the path (one line; the CLI exits 2), and nothing is
  written.
- **All or nothing.** A file is written into a temporary folder beside it and renamed (:func:`atomic_write`); a
  folder of outputs is written into a temporary folder beside it and swapped in with two renames
  (:func:`output_folder`; an empty folder, a mount point or the working directory is filled in place
  instead), with Ctrl-C held back during the swap, so an interrupted or failed write leaves either the older
  complete outputs or the new complete ones, and no temporary files.
- **No litter from a killed run.** Every temporary folder is named ``.NAME.moesim-PID-XXXXXXXX.tmp`` and holds
  a marker with its process id and host (:func:`temporary_folder`). A process killed outright (SIGKILL, power
  loss) cannot clean up; the next check of an output path removes the temporary folders beside it and inside
  it whose marker names a process of this host that is gone (:func:`remove_stale_temporaries`). Nothing
  without the marker, nothing of a live process and nothing of another host is ever removed.
- **Only our own files.** An existing output is replaced only when every file in it is recognised as one that
  moesim writes there (:class:`FolderKind`, and the ``owned`` test of a file); files moesim did not write are
  never deleted.

Names that users give things (scenarios, clusters, placements) become file names only through
:func:`safe_name` / :func:`safe_names`: one path component, never ``.``/``..``, readable where the name was.
Figures are drawn on Matplotlib ``Figure`` objects with an Agg canvas (:func:`figure`), never through pyplot,
so writing plots never changes the backend of a notebook or application that imports moesim.
"""

from __future__ import annotations

import os
import signal
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from moesim.errors import InputError
from moesim.scratch import (  # noqa: F401 - part of this module's interface
    TEMP_MARKER, head, remove_stale_temporaries, remove_temporary, stale_temporary, temporary_folder,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# ---------------------------------------------------------------- names -> file names

_NAME_PUNCTUATION = frozenset(" -_.+=@,()[]~")
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))})
NAME_BYTES = 160  # utf-8 bytes of a safe name: room for a suffix, an extension and a temporary-file prefix


def safe_name(name: str) -> str:
    """``name`` as one file-name component that is safe on every common file system.

    Letters, digits and `` -_.+=@,()[]~`` are kept (so ``greedy``, ``eplb R=16`` and ``hgx-h200-2x8`` stay as
    they are); every other character - path separators, control characters, ``:*?"<>|`` and so on - becomes
    ``_``, as do dots and spaces at either end (no ``.``, ``..`` or hidden files). A name reserved on Windows
    (``CON``, ``nul.txt``) gets a leading ``_``; one longer than :data:`NAME_BYTES` bytes is cut; an empty one
    is ``_``. Two names can map to one safe name: :func:`safe_names` makes those distinct.
    """
    name = unicodedata.normalize("NFC", name)
    chars = [c if c.isalnum() or c in _NAME_PUNCTUATION else "_" for c in name]
    for order in (range(len(chars)), range(len(chars) - 1, -1, -1)):  # leading, then trailing dots and spaces
        for i in order:
            if chars[i] not in ". ":
                break
            chars[i] = "_"
    out = "".join(chars)
    while len(out.encode("utf-8", "surrogatepass")) > NAME_BYTES:
        out = out[:-1]
    out = out.rstrip(". ") or "_"
    if out.split(".")[0].upper() in _RESERVED:
        out = "_" + out
    return out


def safe_names(names: Iterable[str]) -> dict[str, str]:
    """Each of ``names`` (distinct) -> a distinct :func:`safe_name`, also distinct ignoring case (for case-blind
    file systems). Names that are safe as they are keep their own file names; the others take their safe name,
    or, when that is taken, the first free of ``NAME-2``, ``NAME-3``, ... in the order given: deterministic."""
    names = list(dict.fromkeys(names))
    taken: set[str] = set()
    out: dict[str, str] = {}
    for name in names:  # names that need no change first, so they never depend on the others
        safe = safe_name(name)
        if safe == name and safe.casefold() not in taken:
            out[name] = safe
            taken.add(safe.casefold())
    for name in names:
        if name in out:
            continue
        base = safe_name(name)
        candidate, n = base, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{base}-{n}"
        out[name] = candidate
        taken.add(candidate.casefold())
    return out


# ---------------------------------------------------------------- recognising moesim's own files

def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """A test for files that begin with ``prefix``."""
    return lambda path: head(path, len(prefix)) == prefix


def contains(marker: bytes, within: int = 4096) -> Callable[[Path], bool]:
    """A test for files that hold ``marker`` in their first ``within`` bytes."""
    return lambda path: marker in head(path, within)


def is_matplotlib_png(path: Path) -> bool:
    """A PNG file that Matplotlib wrote (its ``Software`` text chunk says so)."""
    data = head(path, 4096)
    return data.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in data


@dataclass(frozen=True)
class FolderKind:
    """What one command writes into its output folder, so that an older run's folder can be told apart from a
    folder holding other files.

    ``files``: file-name pattern -> test that a file of that name is one moesim wrote. ``folders``: sub-folder
    name pattern -> what that sub-folder holds. ``keep``: sub-folders that another command writes inside this
    one (``moesim sweep``'s ``sweep/`` inside a run's folder): recognised, and carried over unchanged when the
    folder is replaced."""

    what: str
    files: Mapping[str, Callable[[Path], bool]] = field(default_factory=dict)
    folders: Mapping[str, FolderKind] = field(default_factory=dict)
    keep: Mapping[str, FolderKind] = field(default_factory=dict)


def foreign_entry(folder: Path, kind: FolderKind, ignore: frozenset[str] = frozenset()) -> Path | None:
    """The first entry under ``folder`` (sorted, depth first) that is not one of ``kind``'s outputs, or None;
    entries of ``folder`` named in ``ignore`` are skipped."""
    try:
        entries = sorted(e for e in folder.iterdir() if e.name not in ignore)
    except OSError:
        return folder
    for entry in entries:
        if entry.is_symlink():
            return entry
        if entry.is_dir():
            sub = kind.keep.get(entry.name) or next((k for pat, k in kind.folders.items()
                                                     if fnmatchcase(entry.name, pat)), None)
            bad = entry if sub is None else foreign_entry(entry, sub)
            if bad is not None:
                return bad
            continue
        test = next((t for pat, t in kind.files.items() if fnmatchcase(entry.name, pat)), None)
        if test is None or not entry.is_file() or not test(entry):
            return entry
    return None


# ---------------------------------------------------------------- checking an output path

def _shown(path: Path) -> str:
    return os.path.abspath(path) if str(path) in ("", ".") else str(path)


def _exists(path: Path, shown: str) -> bool:
    try:
        os.stat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise InputError(f"cannot look at {_shown(path)} ({exc.strerror})", source=shown) from None


def _target(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(absolute path with a final symbolic link followed, the path as the user gave it)."""
    shown = os.fspath(path)
    if not shown:
        raise InputError("an empty path is not an output", source="''")
    p = Path(shown)
    if p.is_symlink():
        if not _exists(p, shown):
            raise InputError("is a symbolic link to nothing", source=shown)
        return Path(os.path.realpath(p)), shown
    return Path(os.path.abspath(p)), shown


def _existing_ancestor(shown: str) -> Path:
    """The nearest folder above ``shown`` that exists; a regular file there, or a broken symbolic link on the
    way, is an InputError."""
    anc = Path(shown).parent
    while not _exists(anc, shown):
        if anc.is_symlink():
            raise InputError(f"{anc} is a symbolic link to nothing", source=shown)
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{anc} is a file, not a folder", source=shown)
    return anc


def _check_writable(folder: Path, shown: str) -> None:
    """Files and folders can be made in ``folder``: asked of the OS, then tried (a temporary folder made and
    removed)."""
    why = None
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "permission denied"
    else:
        try:
            with ctrl_c_deferred():  # never leave the probe behind
                remove_temporary(temporary_folder(folder, "."))
        except OSError as exc:
            why = exc.strerror or str(exc)
    if why:
        raise InputError(f"cannot write into {_shown(folder)} ({why})", source=shown)


def check_output_file(path: str | os.PathLike[str], *, owned: Callable[[Path], bool], what: str) -> Path:
    """Check that ``path`` can take an output file, before the work that makes it; returns it as an absolute
    path. An existing file is replaced only if ``owned`` recognises it as ``what`` (e.g. "a placement file
    moesim wrote"). Stale temporary folders beside it, left by a killed moesim, are removed
    (:func:`remove_stale_temporaries`)."""
    target, shown = _target(path)
    remove_stale_temporaries(target.parent)
    if _exists(target, shown):
        if target.is_dir():
            raise InputError("is a folder; give a file name", source=shown)
        if not target.is_file():
            raise InputError("exists and is not a regular file", source=shown)
        if not owned(target):
            raise InputError(f"exists and is not {what}; moesim replaces only files it wrote: remove it or "
                             "choose another name", source=shown)
        _check_writable(target.parent, shown)
    else:
        _check_writable(_existing_ancestor(shown), shown)
    return target


def check_output_folder(path: str | os.PathLike[str], kind: FolderKind) -> Path:
    """Check that ``path`` can take a folder of ``kind``'s outputs, before the work that makes them; returns it
    as an absolute path. It must not exist, be empty, or hold only ``kind``'s outputs (an older run's), which
    :func:`output_folder` then replaces. Stale temporary folders beside it and inside it, left by a killed
    moesim, are removed first (:func:`remove_stale_temporaries`)."""
    target, shown = _target(path)
    remove_stale_temporaries(target.parent)
    if _exists(target, shown):
        if target.is_dir():
            remove_stale_temporaries(target)
        if not target.is_dir():
            raise InputError("exists and is not a folder; give a new folder, or one holding an older run's "
                             "outputs", source=shown)
        _refuse_foreign(target, kind, shown)
        _check_writable(target if _in_place(target) else target.parent, shown)
        for folder in (target, *(p for p in target.rglob("*") if p.is_dir())):
            if not os.access(folder, os.W_OK | os.X_OK):  # the older outputs must be removable
                raise InputError(f"cannot replace the files in {folder} (permission denied)", source=shown)
    else:
        _check_writable(_existing_ancestor(shown), shown)
    return target


# ---------------------------------------------------------------- writing

@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the duration; one that arrived is raised as KeyboardInterrupt at the end.
    Only in the main thread (elsewhere, signals cannot arrive: nothing to do)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # signals arrive only in the main thread; None: a handler not set from Python, left alone
        return
    caught: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):  # Python's default handler raises KeyboardInterrupt
                previous(signal.SIGINT, caught[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _make_parents(folder: Path) -> list[Path]:
    """``folder`` and its missing parents made; returns those made, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
    except BaseException:
        _remove_made(made)
        raise
    return made


def _remove_made(made: list[Path]) -> None:
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            break


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _cannot_write(shown: str, exc: OSError) -> InputError:
    where = f" {exc.filename}" if exc.filename and str(exc.filename) != shown and ".tmp" not in str(exc.filename) \
        else ""
    return InputError(f"cannot write{where} ({exc.strerror or exc})", source=shown)


def _discard(work: Path) -> None:
    """Remove a temporary folder, quietly: one that cannot be removed now is stale once this process ends, and
    the next check of an output path beside it removes it."""
    try:
        remove_temporary(work)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool = False) -> Path:
    """Write ``path`` through ``write(fh)`` into a temporary folder beside it (:func:`temporary_folder`), then
    rename the file into place: all or nothing.

    Folders made for it are removed again when the write fails or is interrupted; the file system refusing
    (full, read-only, permissions) is an InputError naming ``path``."""
    path = Path(path)
    shown = str(path)
    made: list[Path] = []
    work: Path | None = None
    try:
        made = _make_parents(path.parent)
        work = temporary_folder(path.parent, path.name)
        tmp = work / "new"
        fh = open(tmp, "xb" if binary else "x")  # the mode open() gives, as writing the file in place would
    except OSError as exc:
        if work is not None:
            _discard(work)
        _remove_made(made)
        raise _cannot_write(shown, exc) from None
    try:
        with fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        with ctrl_c_deferred():
            _discard(work)
            _remove_made(made)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp), shown):  # writing it, not reading inputs
            raise _cannot_write(shown, exc) from None
        raise
    _discard(work)
    return path


def _refuse_foreign(target: Path, kind: FolderKind, shown: str, ignore: frozenset[str] = frozenset()) -> None:
    bad = foreign_entry(target, kind, ignore)
    if bad is not None:
        rel = bad.relative_to(target) if bad != target else Path(".")
        raise InputError(f"holds {rel}, which is not one of {kind.what}; moesim replaces only folders of its own "
                         "outputs: choose a new or empty folder", source=shown)


def _in_place(target: Path) -> bool:
    """Whether an existing ``target`` is filled in place rather than swapped for a new folder: when it is empty
    (the user's own folder stays the same folder), a mount point (cannot be renamed), or holds the current
    folder (renaming it would pull the working directory away)."""
    cwd = Path.cwd()
    return not any(target.iterdir()) or os.path.ismount(target) or cwd == target or target in cwd.parents


def _swap_in(work: Path, target: Path, kind: FolderKind, shown: str) -> None:
    """Put the finished folder ``work/new`` (``work`` a temporary folder beside ``target``) at ``target`` with
    two renames, replacing an older run's outputs there, which go to ``work/old``; ``kind.keep`` sub-folders are
    carried over. A crash between the two renames leaves the older outputs whole in ``work/old``, kept until
    ``target`` exists again (:func:`stale_temporary`)."""
    tmp = work / "new"
    try:
        existing = target.is_dir()
        os.chmod(tmp, (target.stat().st_mode & 0o7777) if existing else _umask_mode(0o777))
        if not existing:
            os.rename(tmp, target)
            _discard(work)
            return
    except OSError as exc:
        raise _cannot_write(shown, exc) from None
    _refuse_foreign(target, kind, shown)  # looked at again: the folder may have changed while we worked
    carried = [name for name in kind.keep if (target / name).is_dir() and not os.path.lexists(tmp / name)]
    old = work / "old"
    moved: list[str] = []
    try:
        for name in carried:
            os.rename(target / name, tmp / name)
            moved.append(name)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
    except OSError as exc:
        for name in moved:  # back where they were: the older outputs stay whole
            os.rename(tmp / name, target / name)
        raise _cannot_write(shown, exc) from None
    _discard(work)


def _fill_in_place(work: Path, target: Path, kind: FolderKind, shown: str) -> None:
    """Move the finished outputs from ``work/new`` (``work`` a temporary folder inside ``target``) into
    ``target``, the older outputs first set aside in ``work/old`` and removed at the end; ``kind.keep``
    sub-folders stay. On an error every entry goes back where it was."""
    tmp, old = work / "new", work / "old"
    _refuse_foreign(target, kind, shown, frozenset({work.name}))
    try:
        old.mkdir()
    except OSError as exc:
        raise _cannot_write(shown, exc) from None
    set_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in sorted(target.iterdir()):
            if entry.name != work.name and entry.name not in kind.keep:
                os.rename(entry, old / entry.name)
                set_aside.append(entry.name)
        for entry in sorted(tmp.iterdir()):
            os.rename(entry, target / entry.name)
            moved_in.append(entry.name)
    except OSError as exc:
        for name in moved_in:
            os.rename(target / name, tmp / name)
        for name in set_aside:
            os.rename(old / name, target / name)
        raise _cannot_write(shown, exc) from None
    _discard(work)


@contextmanager
def output_folder(path: str | os.PathLike[str], kind: FolderKind) -> Iterator[Path]:
    """A fresh temporary folder to write ``kind``'s outputs into; when the block ends without an error, its
    contents replace ``path``'s (see :func:`check_output_folder`), with renames during which Ctrl-C is held
    back: the folder is swapped for the new one (two renames), or, when it is empty, a mount point or holds the
    working directory, filled in place. The folder given is ``new`` inside a :func:`temporary_folder` beside
    ``path`` (inside it, when filled in place). On any error or interrupt the temporary folder, and folders made
    for it, are removed, and ``path`` is as it was."""
    target = check_output_folder(path, kind)
    shown = os.fspath(path)
    in_place = target.is_dir() and _in_place(target)
    made: list[Path] = []
    work: Path | None = None
    try:
        try:
            made = _make_parents(target.parent)
            work = temporary_folder(target, ".") if in_place else temporary_folder(target.parent, target.name)
            (work / "new").mkdir()
        except OSError as exc:
            raise _cannot_write(shown, exc) from None
        yield work / "new"
        with ctrl_c_deferred():
            (_fill_in_place if in_place else _swap_in)(work, target, kind, shown)
    except BaseException:
        with ctrl_c_deferred():
            if work is not None:
                _discard(work)
            _remove_made(made)
        raise


def figure(**kwargs: Any) -> Figure:
    """A Matplotlib figure on its own Agg canvas (``Figure(**kwargs)``), for writing to files: pyplot and its
    global backend are never touched, so a notebook's inline plots keep working after moesim draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plain_text(text: str) -> str:
    """``text`` for a figure label, shown as typed: ``$`` does not start Matplotlib mathtext."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------- reading

def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file, bad JSON (:func:`moesim.loaders.read_json`: UTF-8, no key
    twice, finite numbers, bounded nesting) or another top-level type is an InputError."""
    from moesim.loaders import read_json

    src = str(path)
    raw = read_json(path, src)
    if not isinstance(raw, dict):
        raise InputError("must be a JSON object", source=src)
    return raw
