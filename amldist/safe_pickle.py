"""Load dataset pickles (SfM-120k dbs, gnd files) without letting them run code.

The real files hold only dicts, lists, strings, numbers and numpy arrays. The unpickler below
resolves exactly the globals those need and refuses every other one with a UserError, so a
crafted pickle cannot import `os.system` or any other callable.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from amldist.errors import UserError

ALLOWED_GLOBALS = frozenset({
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
})

# Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, 'latin1') (numpy arrays included).
# Only that round trip is needed, so the resolved callable accepts no other codec ...
LATIN1_NAMES = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or str(encoding).lower() not in LATIN1_NAMES or errors != "strict":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    # ... and an empty bytes object as bytes() (an argument could only allocate memory).
    if args:
        raise pickle.UnpicklingError("refusing builtins.bytes with arguments")
    return b""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that only resolves the builtin and numpy names in ALLOWED_GLOBALS."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2 pickles name the builtins module this way
            module = "builtins"
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("builtins", "bytes"):
            return _empty_bytes
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{source}: not a plain dataset pickle ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
            RecursionError) as err:
        raise UserError(f"{source}: corrupt or truncated pickle ({type(err).__name__})") from None


def safe_load(path: str | os.PathLike) -> Any:
    """Read a dataset pickle from `path` through the restricted unpickler."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"expected a file, found a folder: {path}") from None
    return safe_loads(data, source=str(path))
