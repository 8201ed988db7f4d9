"""Build the Cython routing core into the package.

SOLLOL_NO_EXTENSIONS=1 builds a pure-Python install (the twin in
sollol/routing/_score_py.py is used); SOLLOL_DEBUG_BUILD=1 compiles with
bounds checks and without optimisation.
"""

import os

from setuptools import Extension, setup

if os.environ.get("SOLLOL_NO_EXTENSIONS") == "1":
    ext_modules = []
else:
    from Cython.Build import cythonize

    debug = os.environ.get("SOLLOL_DEBUG_BUILD") == "1"
    compile_args = ["-O0", "-g"] if debug else ["-O3"]
    extensions = [
        Extension(
            "sollol.routing._score_c", ["csrc/_score_c.pyx"], extra_compile_args=compile_args
        ),
        Extension(
            "sollol.learning._forest_c", ["csrc/_forest_c.pyx"], extra_compile_args=compile_args
        ),
    ]
    ext_modules = cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "cdivision": True,
        },
        annotate=False,
    )

setup(ext_modules=ext_modules)
