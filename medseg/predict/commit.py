"""All-or-nothing outputs of one series: every file is built under a temporary name beside its final name, and
only when all are built are they renamed into place, in the order given (the record last: it is the commit marker).

A failure before the commit leaves no file of the series behind (neither temporary nor final); a job killed
mid-way leaves only ``.<name>.partial-*`` temporaries, which :func:`remove_partials` clears at the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from medseg.io import PARTIAL_MARK, partial_path

log = logging.getLogger(__name__)


class Staging:
    """Temporary files of one series' outputs, renamed onto their final names by :meth:`commit`.

    >>> import tempfile as t
    >>> folder = Path(t.mkdtemp())
    >>> with staged() as stage:
    ...     _ = stage.path(folder / "a.txt").write_text("a")
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final), in commit order

    def path(self, final: Path) -> Path:
        """The temporary path to build ``final`` at; files are committed in the order they were asked for."""
        tmp = partial_path(Path(final))
        self._pending.append((tmp, Path(final)))
        return tmp

    def commit(self) -> list[Path]:
        """Rename every temporary onto its final name. If a rename fails, the finals already renamed are removed
        again (the series has no outputs rather than some) and the error is raised."""
        done: list[Path] = []
        try:
            for tmp, final in self._pending:
                os.replace(tmp, final)
                done.append(final)
        except BaseException:
            for final in done:
                final.unlink(missing_ok=True)
            raise
        finally:
            self.discard()
        return done

    def discard(self) -> None:
        """Remove every temporary not yet renamed."""
        for tmp, _final in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []


@contextlib.contextmanager
def staged() -> Iterator[Staging]:
    """A :class:`Staging` committed when the block ends normally and discarded when it raises."""
    stage = Staging()
    try:
        yield stage
    except BaseException:
        stage.discard()
        raise
    stage.commit()


def remove_partials(folders: Iterable[Path], prefixes: Iterable[str] | None = None) -> int:
    """Remove ``.*.partial-*`` temporaries a killed run left in ``folders`` (not recursive).

    Args:
        folders: output folders to clear.
        prefixes: only temporaries of finals whose names start with one of these (e.g. the series ids a job
            owns, so that jobs of other series writing into the same folders at the same time keep theirs).

    Returns:
        How many files were removed.
    """
    # ``..name.partial-*`` too: the temporary of a temporary (medseg.io.atomic_path inside a staged path)
    wanted = tuple(m for p in prefixes for m in (f".{p}.", f"..{p}.")) if prefixes is not None else None
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.glob(f".*{PARTIAL_MARK}*"):
            if path.is_file() and (wanted is None or path.name.startswith(wanted)):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed
