"""Files the server re-reads when they change (keys, users, certificates) and writes whole.

A file's stamp, its (modification time, size, inode), changes with any rewrite or
replacement: the inode catches a file replaced by rename (``os.replace``, a Kubernetes
secret's symlink swap) within the file system's timestamp granularity. Checking a stamp
is one ``stat``, cheap enough to do on every call, so a changed file applies from the
next call on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

#: (modification time in ns, size in bytes, inode) of a file, from :func:`file_stamp`.
FileStamp = tuple[int, int, int]

T = TypeVar("T")


def file_stamp(path: Path) -> FileStamp:
    """``path``'s (modification time in ns, size in bytes, inode); ``OSError`` when it cannot be stat'ed."""
    status = os.stat(path)
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def file_stamps(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    """:func:`file_stamp` of each path, in order: files are reloaded when this changes."""
    return tuple(file_stamp(path) for path in paths)


def write_atomically(path: Path, text: str, like: os.stat_result | None = None) -> None:
    """Write ``path`` whole beside it and rename it into place: a reader sees the old file or the new one.

    The new file gets ``like``'s mode and owner (an existing file's, so that the server can
    still read a file rewritten by root); without ``like``, it is readable by its owner only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if like is not None:
            os.chmod(temporary, like.st_mode & 0o7777)
            if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.chown(temporary, like.st_uid, like.st_gid)
                except PermissionError:
                    pass  # not root: the file can only be ours
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def existing_status(path: Path) -> os.stat_result | None:
    """``path``'s status, or None when it does not exist (for :func:`write_atomically`'s ``like``)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


#: ``when_missing`` of a :class:`WatchedFiles` whose content stays while a file is missing.
KEEP: Any = object()


class WatchedFiles(Generic[T]):
    """Content loaded from files, loaded again when a file's stamp changes; safe to use from many threads.

    ``load`` builds the content from the files as they are now, raising ``ValueError`` or
    ``OSError`` when they cannot be used. At start, files that are missing or cannot be used
    raise ``ValueError`` (its message begins with ``what``, which also names them in the log). Later, files that
    cannot be used keep the previous content, with one warning per change, until they are
    fixed. While a file is missing, the content is ``when_missing`` (a removed keys file
    admits no key), or with :data:`KEEP` stays as it was (a certificate being replaced).

    Example::

        keys = WatchedFiles([Path("keys.toml")], lambda: read_keys(Path("keys.toml")), "--auth-keys keys.toml", [])
        for key in keys.current():   # one stat per file while they are unchanged
            ...
    """

    def __init__(self, paths: Sequence[Path], load: Callable[[], T], what: str, when_missing: T = KEEP) -> None:
        self.paths = list(paths)
        self._load = load
        self._what = what
        self._when_missing = when_missing
        self._lock = threading.Lock()
        problem: Exception | None = None
        try:
            # Stamped before loading, so that a change while loading is seen at the next check.
            self._stamp: tuple[FileStamp, ...] | None = file_stamps(self.paths)
        except OSError as missing:
            self._stamp, problem = None, missing
        try:
            self.value: T = load()
        except (OSError, ValueError) as error:
            problem = error  # names the setting the file came from better than the stat does
        if problem is not None:
            raise ValueError(f"{what}: {problem}") from None
        self._refused: object = None
        #: Bumped whenever the content changes (how many times the files were loaded after the first):
        #: what was derived from an older content is stale.
        self.generation = 0

    def current(self) -> T:
        """The content now: loaded again when a file's stamp changed."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[T, int]:
        """The content now and its :attr:`generation`, taken together."""
        with self._lock:
            self._refresh()
            return self.value, self.generation

    def _refresh(self) -> None:
        try:
            stamp = file_stamps(self.paths)
        except FileNotFoundError:
            if self._when_missing is not KEEP and self._stamp is not None:
                log.warning("%s was removed: reading it as empty until it is back", self._what)
                self._replace(None, self._when_missing)
            return
        except OSError as error:
            self._keep_previous(("stat", error.errno), error)
            return
        if stamp == self._stamp or stamp == self._refused:
            return
        try:
            value = self._load()
        except (OSError, ValueError) as error:
            self._keep_previous(stamp, error)
            return
        self._replace(stamp, value)
        log.info("%s reloaded", self._what)

    def _keep_previous(self, refused: object, error: Exception) -> None:
        if refused != self._refused:
            self._refused = refused
            log.warning("%s changed but cannot be used (%s); keeping the previous one", self._what, error)

    def _replace(self, stamp: tuple[FileStamp, ...] | None, value: T) -> None:
        self._stamp, self.value, self._refused = stamp, value, None
        self.generation += 1


def watched_file(path: Path, parse: Callable[[Path], T], when_missing: T, flag: str) -> WatchedFiles[T]:
    """One file of setting ``flag`` (``--auth-keys``), parsed by ``parse`` and read again when it changes."""
    return WatchedFiles([path], lambda: parse(path), f"{flag} {path}", when_missing)
