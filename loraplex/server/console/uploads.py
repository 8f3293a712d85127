"""An uploaded PEFT adapter, as a zip of its folder or as its two files, into a folder.

Only adapter_config.json and adapter_model.safetensors are taken (what the registry reads),
found by their base names wherever they sit in the zip or the picked folder; anything else is
ignored. A zip's sizes are checked before anything is written, so a zip bomb is refused.
"""

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from starlette.datastructures import UploadFile

from loraplex.server.admin import UPLOAD_FILES
from loraplex.server.console.guard import FormError


def save_adapter_files(uploads: list[UploadFile], dest: Path, max_bytes: int) -> None:
    """Write the adapter's files from `uploads` into `dest`; FormError naming what is wrong."""
    if not uploads:
        raise FormError("files: choose the adapter's folder, its two files, or a zip of them")
    if len(uploads) == 1 and uploads[0].filename.lower().endswith(".zip"):
        _unzip(uploads[0], dest, max_bytes)
    else:
        for upload in uploads:
            name = PurePosixPath(upload.filename.replace("\\", "/")).name
            if name in UPLOAD_FILES:
                with open(dest / name, "wb") as out:
                    shutil.copyfileobj(upload.file, out)
    missing = [name for name in UPLOAD_FILES if not (dest / name).is_file()]
    if missing:
        raise FormError(f"files: the upload has no {' and no '.join(missing)}")


def _unzip(upload: UploadFile, dest: Path, max_bytes: int) -> None:
    try:
        archive = zipfile.ZipFile(upload.file)
    except zipfile.BadZipFile:
        raise FormError(f"files: {upload.filename!r} is not a valid zip file") from None
    with archive:
        members = {}
        for info in archive.infolist():
            name = PurePosixPath(info.filename).name
            if name in UPLOAD_FILES and not info.is_dir():
                if name in members:
                    raise FormError(f"files: the zip holds more than one {name}")
                members[name] = info
        if sum(info.file_size for info in members.values()) > max_bytes:
            raise FormError(f"files: the adapter is larger than {max_bytes} bytes unpacked")
        for name, info in members.items():
            with archive.open(info) as source, open(dest / name, "wb") as out:
                shutil.copyfileobj(source, out)
