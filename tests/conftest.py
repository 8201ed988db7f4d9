import numpy as np
import pytest

from sollol.routing import _select_py, select

pytest_plugins = ["tests.support.fixtures"]


def _compiled_least_loaded():
    if select.NO_EXTENSIONS:
        pytest.skip("SOLLOL_NO_EXTENSIONS=1 forces the pure twin")
    if not select.COMPILED:
        pytest.fail("the compiled routing core did not load")
    from sollol.routing import _select_c

    return _select_c.least_loaded


@pytest.fixture(params=["compiled", "pure"])
def least_loaded(request):
    """Each selection test runs against both implementations."""
    if request.param == "compiled":
        return _compiled_least_loaded()
    return _select_py.least_loaded


@pytest.fixture
def rng():
    return np.random.default_rng(0)
