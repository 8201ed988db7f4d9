"""The scoring core: the compiled module when it loads, else the pure twin.

Set SOLLOL_NO_EXTENSIONS=1 to force the pure-Python twin. ``COMPILED`` is
True when the compiled one is in use; the test suite fails when the
extension was built but did not load.
"""

import os

NO_EXTENSIONS = os.environ.get("SOLLOL_NO_EXTENSIONS") == "1"

if NO_EXTENSIONS:
    from ._score_py import score_nodes

    COMPILED = False
else:
    try:
        from ._score_c import score_nodes
    except ImportError:
        from ._score_py import score_nodes

        COMPILED = False
    else:
        COMPILED = True

__all__ = ["COMPILED", "NO_EXTENSIONS", "score_nodes"]
