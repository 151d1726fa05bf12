"""One package per op: ``api.py`` (public surface), ``reference.py`` (torch), ``triton.py``, ``cuda.py``."""
