"""The direct CHOLMOD binding (convmat.analysis.cholmod) against cvxopt's own interface to the
same library, and against numpy, on random sparse symmetric matrices: positive definite ones
(the factor, its diagonal and a solve agree) and ones that are not (both fail at one column,
the column where the matrix must fail)."""

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from convmat import ConvMatError
from convmat.analysis import cholmod

pytest.importorskip("cvxopt")
cvxopt = cholmod.load_cvxopt()  # cvxopt, its cholmod module loaded


def lower_triplets(a):
    row, col = np.nonzero(np.tril(a))  # sorted by row, then column
    return row, col, a[row, col]


def random_matrix(n, density, seed, bad):
    """``B B^T + I`` with ``B`` sparse: positive definite, every eigenvalue >= 1; with the
    diagonal entry ``bad`` set to -1 it is not, and (every principal submatrix without ``bad``
    being positive definite) elimination fails exactly at ``bad``. And a random order."""
    rng = np.random.default_rng(seed)
    b = sp.random(n, n, density=density, random_state=rng, data_rvs=rng.standard_normal)
    a = (b @ b.T).toarray() + np.eye(n)
    if bad is not None:
        a[bad, bad] = -1.0
    return a, rng.permutation(n), rng


def cvxopt_factor(a, perm):
    """cvxopt's interface with the binding's options: supernodal, the given order only."""
    row, col, values = lower_triplets(a)
    m = cvxopt.spmatrix(values.tolist(), row.tolist(), col.tolist(), a.shape)
    saved = dict(cvxopt.cholmod.options)
    cvxopt.cholmod.options.update(supernodal=2, nmethods=1)
    try:
        f = cvxopt.cholmod.symbolic(m, p=cvxopt.matrix(perm.tolist(), tc="i"), uplo="L")
        try:
            cvxopt.cholmod.numeric(m, f)
        except ArithmeticError as err:
            return f, int(err.args[0])
        return f, None
    finally:
        cvxopt.cholmod.options.clear()
        cvxopt.cholmod.options.update(saved)


@given(
    n=st.integers(1, 40),
    density=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
    indefinite=st.booleans(),
    data=st.data(),
)
def test_the_binding_agrees_with_cvxopt(n, density, seed, indefinite, data):
    bad = data.draw(st.integers(0, n - 1)) if indefinite else None
    a, perm, rng = random_matrix(n, density, seed, bad)
    theirs, their_failure = cvxopt_factor(a, perm)
    with cholmod.library().factor(*lower_triplets(a), perm, n) as ours:
        assert ours.failed_column == their_failure
        order = ours.perm()
        assert sorted(order.tolist()) == list(range(n))
        if bad is not None:
            assert ours.failed_column is not None
            assert order[ours.failed_column] == bad  # the column where it must fail
            through_cvxopt = cholmod.factor_cvxopt(*lower_triplets(a), perm, n, {})
            assert through_cvxopt.failed_column == ours.failed_column
        else:
            assert ours.failed_column is None
            check_factor(ours, theirs, a, order, rng)


def check_factor(ours, theirs, a, order, rng):
    n = len(a)
    lower = ours.lower().toarray()
    # numpy: L L^T is the matrix in the factor's order
    scale = np.abs(a).max()
    np.testing.assert_allclose(lower @ lower.T, a[order][:, order], rtol=0, atol=1e-12 * scale)
    # cvxopt: the same diagonal of L, and the same solution of A x = b
    their_diagonal = np.array(cvxopt.cholmod.diag(theirs)).ravel()
    np.testing.assert_allclose(ours.diagonal(), their_diagonal, rtol=1e-14)
    b = rng.standard_normal(n)
    their_x = cvxopt.matrix(b.tolist(), (n, 1))
    cvxopt.cholmod.solve(theirs, their_x)
    y = scipy.linalg.solve_triangular(lower, b[order], lower=True)
    x = np.empty(n)
    x[order] = scipy.linalg.solve_triangular(lower.T, y, lower=False)
    np.testing.assert_allclose(x, np.array(their_x).ravel(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    # the stored rows hold at least L's non-zeros
    assert (ours.row_counts() >= (lower != 0).sum(1)).all()
    assert ours.stored_entries >= np.count_nonzero(lower)


def test_factor_goes_through_cvxopt_where_the_library_is_refused(monkeypatch):
    a, perm, _ = random_matrix(12, 0.2, 7, bad=4)
    direct = cholmod.factor(*lower_triplets(a), perm, 12, {})
    assert direct.via == "direct"
    monkeypatch.setattr(cholmod, "_LIBRARY", [ConvMatError("refused")])
    fallback = cholmod.factor(*lower_triplets(a), perm, 12, {})
    assert fallback.via == "cvxopt"
    assert fallback.failed_column == direct.failed_column is not None


def test_a_layout_that_differs_is_refused(monkeypatch):
    path = cholmod.library().path
    monkeypatch.setitem(cholmod._DEFAULTS, "grow0", 1.25)  # as if a field had moved
    with pytest.raises(
        ConvMatError, match=r"does not have the layout convmat reads.*'grow0': 1\.2"
    ):
        cholmod.Cholmod(path)


def test_missing_cvxopt_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cvxopt", None)
    with pytest.raises(ConvMatError, match=r'pip install "convmat\[certify\]"'):
        cholmod.load_cvxopt()
