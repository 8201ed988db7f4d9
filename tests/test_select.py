import importlib.machinery
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sollol.routing import _select_py, select


def _extension_files() -> list[Path]:
    folder = Path(select.__file__).parent
    return [
        path
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for path in folder.glob(f"_select_c*{suffix}")
    ]


def test_extension_loaded_when_built():
    if select.NO_EXTENSIONS:
        assert not select.COMPILED
        return
    built = _extension_files()
    assert built, "the Cython extension was not built; run `pip install -e .` with Cython"
    assert select.COMPILED, f"extension {built[0].name} exists but did not import"


def test_no_extensions_variable_forces_twin(monkeypatch):
    monkeypatch.setenv("SOLLOL_NO_EXTENSIONS", "1")
    import importlib

    try:
        reloaded = importlib.reload(select)
        assert not reloaded.COMPILED
        assert reloaded.least_loaded is _select_py.least_loaded
    finally:
        monkeypatch.delenv("SOLLOL_NO_EXTENSIONS")
        importlib.reload(select)


def ints(values):
    return np.asarray(values, dtype=np.int64)


def test_least_loaded_picks_minimum(least_loaded):
    assert least_loaded(ints([3, 1, 2]), ints([0, 1, 2]), 0) == 1


def test_least_loaded_ignores_non_candidates(least_loaded):
    assert least_loaded(ints([3, 0, 2]), ints([0, 2]), 0) == 2


def test_least_loaded_empty_candidates(least_loaded):
    assert least_loaded(ints([0, 0]), ints([]), 5) == -1


def test_least_loaded_rotates_ties(least_loaded):
    in_flight = ints([0, 0, 0])
    candidates = ints([0, 1, 2])
    picks = [least_loaded(in_flight, candidates, start) for start in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_least_loaded_negative_start(least_loaded):
    assert least_loaded(ints([0, 0]), ints([0, 1]), -1) == 1


@pytest.mark.parametrize("bad_index", [-1, 3, 100])
def test_least_loaded_rejects_bad_index(least_loaded, bad_index):
    with pytest.raises(ValueError, match="out of range"):
        least_loaded(ints([0, 0, 0]), ints([0, bad_index]), 0)


@pytest.mark.parametrize(
    "in_flight",
    [[0, 1], np.asarray([0, 1], dtype=np.float64), np.asarray([0, 1], dtype=np.int32)],
    ids=["list", "float64", "int32"],
)
def test_least_loaded_rejects_wrong_array_type(least_loaded, in_flight):
    with pytest.raises((TypeError, ValueError)):
        least_loaded(in_flight, ints([0, 1]), 0)


@st.composite
def node_states(draw):
    node_count = draw(st.integers(min_value=0, max_value=40))
    in_flight = draw(
        st.lists(
            st.integers(min_value=-(2**62), max_value=2**62),
            min_size=node_count,
            max_size=node_count,
        )
    )
    candidates = (
        draw(st.lists(st.integers(min_value=0, max_value=node_count - 1), max_size=60))
        if node_count
        else []
    )
    start = draw(st.integers(min_value=-(2**40), max_value=2**40))
    return ints(in_flight), ints(candidates), start


@given(node_states())
def test_compiled_and_twin_agree(state):
    if not select.COMPILED:
        pytest.fail("compiled extension not loaded; cannot compare the twins")
    from sollol.routing import _select_c

    in_flight, candidates, start = state
    assert _select_c.least_loaded(in_flight, candidates, start) == _select_py.least_loaded(
        in_flight, candidates, start
    )


@given(node_states())
def test_least_loaded_result_is_a_minimum(state):
    in_flight, candidates, start = state
    chosen = _select_py.least_loaded(in_flight, candidates, start)
    if len(candidates) == 0:
        assert chosen == -1
    else:
        assert chosen in candidates.tolist()
        assert in_flight[chosen] == min(in_flight[candidates].tolist())
