"""Files and folders written atomically: a temporary sibling, then a rename.

A crash or kill while writing leaves any earlier file or folder as it was,
so a `ModelCheckpoint`, a preset or a serving export is never half-written.
"""

import os
import shutil
import tempfile
from pathlib import Path


def write_file_atomically(save_fn, filepath, overwrite=True, **kwargs):
    """Calls `save_fn(tmp, overwrite=True, **kwargs)`, then renames `tmp` to `filepath`.

    `tmp` is a new file beside `filepath` with the same suffix (Keras picks
    the format from it: `.keras`, `.weights.h5`). A `filepath` that is not a
    path (e.g. a file object) is passed to `save_fn` as is.
    """
    if not isinstance(filepath, (str, os.PathLike)):
        return save_fn(filepath, overwrite=overwrite, **kwargs)
    path = Path(filepath)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        save_fn(tmp, overwrite=True, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomically(filepath, obj, indent=None):
    """Writes `obj` as JSON to `filepath` through `write_file_atomically`."""
    import json

    write_file_atomically(lambda tmp, **_: Path(tmp).write_text(json.dumps(obj, indent=indent)), filepath)


def write_directory_atomically(directory, write):
    """Calls `write(tmp)` on a new sibling folder, then renames it to `directory`.

    An existing `directory` is untouched until `write` has returned. It is
    then swapped out by two renames: a kill between them leaves the old
    folder in a hidden `.NAME.old*` sibling and no `directory`; a kill
    during `write` leaves a hidden `.NAME.tmp*` sibling. Returns
    `Path(directory)`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        write(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old"))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
