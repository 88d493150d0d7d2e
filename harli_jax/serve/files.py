"""The uploaded-file store: fine-tuning data on disk, validated before it is kept.

Each file is ``<id>.jsonl`` beside ``<id>.json`` (its metadata), both written to a temporary name
and renamed into place, so a crash never leaves a half-written file that looks valid, and files
outlive the server (jobs that a restart resumes still find their data). An upload is validated
line by line with `harli_jax.lora.data.load_jsonl` and refused, naming the line, if any is bad.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from harli_jax.lora.data import DataError, load_jsonl
from harli_jax.serve.protocol import FileObject

_ID = re.compile(r"file-[0-9a-f]{24}")


class FileStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, upload: BinaryIO, filename: str) -> FileObject:
        """Stores a jsonl upload; raises `DataError` naming the first bad line."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        data, partial = self.path(file_id), self.root / f".{file_id}.jsonl.partial"
        try:
            with partial.open("wb") as out:
                shutil.copyfileobj(upload, out)
            try:
                load_jsonl(partial)
            except DataError as err:
                # Name the file as the user knows it, not by our temporary path.
                raise DataError(str(err).replace(str(partial), filename)) from None
            info = FileObject(
                id=file_id,
                bytes=partial.stat().st_size,
                created_at=int(time.time()),
                filename=filename,
            )
            _write_atomic(self._meta(file_id), info.model_dump_json().encode())
            os.replace(partial, data)
        finally:
            partial.unlink(missing_ok=True)
        return info

    def get(self, file_id: str) -> FileObject:
        """KeyError if there is no such file."""
        if not _ID.fullmatch(file_id) or not self.path(file_id).is_file():
            raise KeyError(file_id)
        return FileObject.model_validate(json.loads(self._meta(file_id).read_text()))

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def list(self) -> list[FileObject]:
        """Every stored file, oldest first."""
        ids = [p.stem for p in self.root.glob("file-*.jsonl")]
        return sorted((self.get(i) for i in ids), key=lambda f: (f.created_at, f.id))

    def delete(self, file_id: str) -> None:
        """KeyError if there is no such file."""
        self.get(file_id)
        self.path(file_id).unlink()
        self._meta(file_id).unlink(missing_ok=True)

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
