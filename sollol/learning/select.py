"""Forest evaluation: the compiled module when it loads, else the pure twin.

SOLLOL_NO_EXTENSIONS=1 forces the pure-Python twin, as for the scoring core.
``COMPILED`` is True when the compiled one is in use.
"""

import os

NO_EXTENSIONS = os.environ.get("SOLLOL_NO_EXTENSIONS") == "1"

if NO_EXTENSIONS:
    from ._forest_py import predict_raw, score_candidates

    COMPILED = False
else:
    try:
        from ._forest_c import predict_raw, score_candidates
    except ImportError:
        from ._forest_py import predict_raw, score_candidates

        COMPILED = False
    else:
        COMPILED = True

__all__ = ["COMPILED", "NO_EXTENSIONS", "predict_raw", "score_candidates"]
