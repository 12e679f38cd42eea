"""Opening a GGUF file, shared by the weight import (`gguf_io`) and the tokenizer, which both
read one: in its own module so that neither imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

from rlver_jax.model_io.weight_map import WeightError


def gguf_field(
    reader: GGUFReader, key: str, source: str, error: type[Exception], default: Any = ...
) -> Any:
    """The value of metadata `key`; `default` when it is missing, else `error` naming it."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise error(f"{source}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def open_gguf(reader_or_path: Any) -> tuple[GGUFReader, str]:
    """A `GGUFReader` and the file name to put in error messages."""
    if isinstance(reader_or_path, GGUFReader):
        return reader_or_path, str(getattr(reader_or_path.data, "filename", "<gguf>"))
    path = Path(reader_or_path)
    if not path.is_file():
        raise WeightError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(path), str(path)
    except (ValueError, OSError) as err:
        raise WeightError(f"{path}: not a readable GGUF file ({err})") from None
