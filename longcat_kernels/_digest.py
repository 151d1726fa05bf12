"""The digest of the kernel sources, shared by ``_ext.py`` and ``setup.py``.

Standard library only: ``setup.py`` loads this file by path (the package is not importable while
building), writes the digest next to the built ``_C`` (``_C.csrc_sha1``), and ``_ext.py`` refuses a
prebuilt ``_C`` whose sources have changed since.
"""

import hashlib
import os

# the kernel sources: what the digest covers and what the wheel carries for a JIT build (``_csrc/``)
SOURCE_SUFFIXES = (".cu", ".cpp", ".h", ".cuh")


def csrc_digest(src: str) -> str:
    """sha1 over the kernel sources in ``src`` (names and contents, by name)."""
    h = hashlib.sha1()
    for name in sorted(f for f in os.listdir(src) if f.endswith(SOURCE_SUFFIXES)):
        with open(os.path.join(src, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()
