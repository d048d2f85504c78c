"""One check of every path a tool writes, made before the work starts.

A tool that computes for minutes and then fails to write its result (the
output is an existing folder, its parent is a file, the folder is read-only)
loses the work; :func:`check_output_path` refuses such a path up front, with
the option that would fix it.
"""
import os
import tempfile

__all__ = ["OutputPathError", "check_output_path"]


class OutputPathError(ValueError):
    """An output path that cannot be written (or would replace a file without being asked); names the path."""


def _writable_folder(folder: str, what: str, path: str, create: bool = True) -> None:
    """Create ``folder`` if missing (or, without ``create``, check its nearest existing parent) and check
    that files can be created there."""
    probe = os.path.abspath(folder)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputPathError(f"{what} {path}: {probe} is a file, not a folder, so nothing can be written under it.")
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise OutputPathError(f"{what} {path}: cannot create the folder {folder} ({e.strerror or e}).") from None
    else:
        folder = probe  # created by the tool when it writes; nothing is left behind if the work fails first
    if not os.path.isdir(folder):
        return
    try:  # a real write: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".pvt_d2_write_test_", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputPathError(f"{what} {path}: the folder {folder} is not writable ({e.strerror or e}); choose "
                              f"another location.") from None


def check_output_path(path: str, kind: str = "file", *, overwrite: bool = True, what: str = "output",
                      flag: str = "--overwrite", create: bool = True) -> str:
    """Check (and prepare) a path a tool is about to write, before any work is done.

    Missing parent folders are created; a path of the wrong kind (a folder
    where a file goes, a file where a folder goes, a file among the parents)
    or an unwritable folder is refused; an existing file is refused unless
    ``overwrite``.

    Args:
        path: the file or folder to be written.
        kind: ``"file"`` or ``"dir"``.
        overwrite: an existing file may be replaced (for ``kind="file"``).
        what: how the message names the path (e.g. ``"--output"``).
        flag: the option that allows replacing an existing file.
        create: create missing folders now; with False they are only checked (the tool creates them when it
            writes, so a run that fails before writing leaves no empty folder).

    Returns:
        ``path``.

    Raises:
        OutputPathError: naming the path and what to do.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    if not path:
        raise OutputPathError(f"{what} is empty: name a {'file' if kind == 'file' else 'folder'} to write.")
    if kind == "dir":
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputPathError(f"{what} {path} is an existing file, not a folder; choose a folder.")
        _writable_folder(path, what, path, create)
        return path
    if os.path.isdir(path):
        raise OutputPathError(f"{what} {path} is an existing folder; name the file to write inside it.")
    _writable_folder(os.path.dirname(os.path.abspath(path)), what, path, create)
    if os.path.exists(path) and not overwrite:
        raise OutputPathError(f"{what} {path} exists; pass {flag} to replace it, or choose another name.")
    return path
