"""The files a user passes (a file or a folder): every entry listed, each with why it cannot be read, never left out
silently.
"""

import os
import stat
from pathlib import Path

from fetalbrain.data.images import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom

NOT_AN_IMAGE = "not an image or DICOM file"  # evaluate lists such files as ignored, not as bad images


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be predicted, or None: a plain check of the entry, never a read of a pipe or device."""
    try:
        mode = path.stat().st_mode  # follows a symbolic link
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file not found"
    except OSError as error:  # a loop of symbolic links, a parent folder without permission
        return f"cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if path.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS:
        return None  # decoding problems (truncated, not really an image) are the reader's to report
    try:
        if is_dicom(path):  # ultrasound machines often write DICOM files without a suffix
            return None
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return f"{NOT_AN_IMAGE} (suffix {path.suffix or 'none'})"


def input_files(inputs: Path, recursive: bool = True) -> list[tuple[Path, str | None]]:
    """Every entry of a file or folder (searched recursively, following links to folders once), sorted, each
    with None when it is to be predicted or the reason it cannot be: a broken symbolic link, a file without
    read permission, a pipe, a file that is neither an image nor DICOM, a folder that cannot be listed.
    Nothing is left out silently: ``predict`` gives every entry a row. ``recursive=False``: the folder's own
    files only (what the folder-per-class reader reads; ``evaluate`` checks class folders with it)."""
    if not os.path.lexists(inputs):
        raise FileNotFoundError(f"inputs={inputs}: no such file or folder")
    if not inputs.is_dir():
        return [(inputs, _problem(inputs))]
    entries: list[tuple[Path, str | None]] = []
    visited: set[Path] = set()

    def walk(folder: Path) -> None:
        visited.add(folder.resolve())
        try:
            children = sorted(folder.iterdir())
        except OSError as error:
            entries.append((folder, f"folder cannot be read ({error.strerror or error})"))
            return
        for child in children:
            if not child.is_dir():
                entries.append((child, _problem(child)))
            elif recursive and child.resolve() in visited:
                entries.append((child, f"folder already read (a symbolic link to {child.resolve()})"))
            elif recursive:
                walk(child)

    walk(inputs)
    return sorted(entries)
