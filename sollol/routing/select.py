"""Routing primitives: the compiled core when it loads, else the pure twins.

Set SOLLOL_NO_EXTENSIONS=1 to force the pure-Python twins. ``COMPILED`` is
True when the compiled ones are in use; the test suite fails when the
extensions were built but did not load.
"""

import os

NO_EXTENSIONS = os.environ.get("SOLLOL_NO_EXTENSIONS") == "1"

if NO_EXTENSIONS:
    from ._score_py import score_nodes
    from ._select_py import least_loaded

    COMPILED = False
else:
    try:
        from ._score_c import score_nodes
        from ._select_c import least_loaded
    except ImportError:
        from ._score_py import score_nodes
        from ._select_py import least_loaded

        COMPILED = False
    else:
        COMPILED = True

__all__ = ["COMPILED", "NO_EXTENSIONS", "least_loaded", "score_nodes"]
