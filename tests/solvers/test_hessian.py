"""bpdq/solvers/hessian.py: streaming accumulation, dead inputs, damped inverse Cholesky with retries."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bpdq
from bpdq.solvers.hessian import (
    HessianAccumulator,
    check_hessian,
    damped_inverse_cholesky,
    fix_dead_inputs,
    inverse_cholesky,
    row_blocks,
)
from tests.solvers.cases import correlated_hessian
from tests.strategies import seeds


@given(seed=seeds, n=st.sampled_from([8, 24]), leading=st.sampled_from([(5,), (2, 3), (1, 4, 2)]))
def test_accumulator_equals_batch_formula_for_any_leading_shape(seed, n, leading):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(*leading, n, generator=gen) for _ in range(3)]
    acc = HessianAccumulator(n)
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, n) for b in batches]).double()
    expected = 2.0 / X.shape[0] * X.T @ X
    assert acc.n == X.shape[0]
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    acc64 = HessianAccumulator(n, dtype=torch.float64)
    for b in batches:
        acc64.add(b)
    assert acc64.hessian.dtype == torch.float64
    torch.testing.assert_close(acc64.hessian, expected, rtol=1e-12, atol=1e-12)


def test_accumulator_rejects_bad_inputs():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration inputs"):
        acc.hessian
    with pytest.raises(ValueError, match="in_features=4"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        acc.add([[1.0, 2.0, 3.0, 4.0]])
    acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.hessian
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        HessianAccumulator(4, dtype=torch.float16)


def test_reduce_combines_accumulators_block_by_block():
    """``reduce`` hands each float64 block and the count to the given function: summing two accumulators'
    blocks (what a distributed all-reduce does) gives the Hessian of one accumulator over all the inputs."""
    n = 800  # three blocks of rows (384 each)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(50, n, generator=gen), torch.randn(70, n, generator=gen)]
    whole, first, second = HessianAccumulator(n), HessianAccumulator(n), HessianAccumulator(n)
    for b in batches:
        whole.add(b)
    first.add(batches[0])
    second.add(batches[1])
    sent = []

    def record(block, count):
        sent.append((block, count))
        return block, count

    before = second.hessian
    second.reduce(record)  # the identity: a single process
    assert len(sent) == 3 and all(block.dtype == torch.float64 and count == 70 for block, count in sent)
    assert second.n == 70 and torch.equal(second.hessian, before)
    others = iter(sent)

    def add_other(block, count):
        other, other_count = next(others)
        return block + other, count + other_count

    first.reduce(add_other)
    assert first.n == whole.n == 120
    assert torch.equal(first.hessian, whole.hessian)
    with pytest.raises(ValueError, match="nothing to reduce"):
        HessianAccumulator(n).reduce(record)


def test_check_hessian_names_the_problem():
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        check_hessian(torch.eye(4), 3)
    with pytest.raises(ValueError, match="square"):
        check_hessian(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_hessian(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_hessian([[1.0]])
    with pytest.raises(TypeError, match="floating point"):
        check_hessian(torch.eye(4, dtype=torch.int64))
    check_hessian(torch.eye(4), 4)  # valid


def test_hessians_that_cannot_come_from_calibration_are_errors():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    H = 2 / 64 * x.T @ x
    check_hessian(H, 16)
    with pytest.raises(ValueError, match="16 negative diagonal entries, so it is not positive semi-definite"):
        check_hessian(-H, 16)
    with pytest.raises(ValueError, match="all zero.*solver 'rtn'"):
        check_hessian(torch.zeros(16, 16), 16)
    skew = H.clone()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        check_hessian(skew, 16)


@pytest.mark.parametrize("solver", ["rtn", "gptq", "bpdq"])
def test_solvers_reject_negated_and_zero_hessians_before_solving(solver):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    H = 2 / 64 * x.T @ x
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    for bad, match in ((-H, "not positive semi-definite"), (torch.zeros(32, 32), "all zero")):
        with pytest.raises(ValueError, match=match):
            bpdq.quantize_weight(W, bad, grid={"type": "bitplane", "planes": 2}, solver=solver, group_size=32)


def test_an_indefinite_hessian_with_a_positive_diagonal_is_damped_with_a_warning(caplog):
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2: needs damp > 2
    with caplog.at_level("WARNING", logger="bpdq.solvers.hessian"):
        U, lam, retries = inverse_cholesky(H, 0.01)
    assert retries > 0 and lam > 2.0 and torch.isfinite(U).all()
    assert "retrying with damp" in caplog.text


def test_dead_inputs_get_unit_diagonal_and_zero_weights():
    H = correlated_hessian(8, 0)
    H[2, :] = 0
    H[:, 2] = 0
    H[5, :] = 0
    H[:, 5] = 0
    W = torch.randn(3, 8)
    W2, H2, n_dead = fix_dead_inputs(W, H)
    assert n_dead == 2
    assert torch.all(W2[:, [2, 5]] == 0) and torch.equal(W2[:, [0, 1, 3, 4, 6, 7]], W[:, [0, 1, 3, 4, 6, 7]])
    assert H2[2, 2] == 1 and H2[5, 5] == 1 and H[2, 2] == 0  # input untouched
    same_W, same_H, none = fix_dead_inputs(W, correlated_hessian(8, 1))
    assert none == 0 and same_W is W


@given(seed=seeds, damp=st.sampled_from([0.0, 0.01, 0.1]))
def test_inverse_cholesky_factorizes_the_damped_inverse(seed, damp):
    H = correlated_hessian(16, seed).double()
    U, used, retries = inverse_cholesky(H, damp)
    assert retries == 0 and used == damp
    assert torch.equal(U, torch.triu(U))
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(16, dtype=H.dtype)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)


def test_rank_deficient_hessian_retries_with_larger_damping_and_warns(caplog):
    x = torch.randn(3, 12, dtype=torch.float64)  # rank 3 < 12
    H = x.T @ x
    with caplog.at_level(logging.WARNING, logger="bpdq.solvers.hessian"):
        U, used, retries = inverse_cholesky(H, 0.0)
    assert retries >= 1 and used > 0
    assert "retrying with damp" in caplog.text
    assert torch.isfinite(U).all()
    Hd = H + used * torch.diagonal(H).mean() * torch.eye(12, dtype=H.dtype)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-6, atol=1e-8)


def test_indefinite_hessian_that_damping_cannot_fix_is_a_value_error():
    H = torch.tensor([[1.0, 100.0], [100.0, 1.0]])  # eigenvalue -99: damping 0.01 * 10^2 is not enough
    with pytest.raises(ValueError, match="could not be factorized"):
        inverse_cholesky(H, 0.01, max_retries=2)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        inverse_cholesky(torch.eye(4), -1.0)


@given(seed=seeds, damp=st.sampled_from([0.0, 0.01]))
def test_inverse_cholesky_equals_the_explicit_damped_formula_and_leaves_h_alone(seed, damp):
    H = correlated_hessian(24, seed)
    before = H.clone()
    U, used, _ = inverse_cholesky(H, damp)
    L = torch.linalg.cholesky(H + (used * float(torch.diagonal(H).mean())) * torch.eye(24))
    assert torch.equal(U, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True))  # damping added in place: same bits
    assert torch.equal(H, before)


def test_a_retry_rebuilds_the_working_copy_without_the_failed_damping():
    calls = []
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # needs damp > 2

    def build():
        calls.append(1)
        return H.clone()

    U, lam, retries, mean_diag = damped_inverse_cholesky(build, 0.01)
    assert len(calls) == retries + 1 and mean_diag == 1.0
    L = torch.linalg.cholesky(H + lam * torch.eye(2))
    assert torch.equal(U, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True))


def test_check_hessian_finds_defects_in_any_block_of_rows():
    n = 2100  # two blocks of rows at the default block size
    assert len(row_blocks(n)) == 2
    H = torch.eye(n)
    check_hessian(H)
    bad = H.clone()
    bad[n - 1, 3] = 0.5  # below the diagonal, in the second block only
    with pytest.raises(ValueError, match="not symmetric"):
        check_hessian(bad)
    bad = H.clone()
    bad[n - 2, n - 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_hessian(bad)
    scaled = H.clone()
    scaled[n - 1, n - 1] = 1e6  # the largest entry sets the tolerance, wherever it is
    scaled[0, 1], scaled[1, 0] = 1.0, 1.5
    check_hessian(scaled)


def test_row_blocks_cover_every_row_once():
    for n in (1, 7, 2048, 5000):
        blocks = row_blocks(n, elements=4096)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and all(r0 < r1 for r0, r1 in blocks)


def test_the_accumulator_sums_the_upper_triangle_and_mirrors_it():
    n = 2100  # two blocks of rows
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(300, n, generator=gen) for _ in range(2)]
    acc = HessianAccumulator(n)
    for b in batches:
        acc.add(b)
    H = acc.hessian
    assert torch.equal(H[1000:, :900], H[:900, 1000:].T)  # outside the diagonal blocks: exactly symmetric
    full = sum(b.T.double() @ b.double() for b in batches) * (2.0 / 600)
    torch.testing.assert_close(H.double(), full, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.hessian, H)  # handing it out again gives the same (the sums are not scaled in place)
    acc64 = HessianAccumulator(n, dtype=torch.float64)
    acc64.add(batches[0])
    assert torch.equal(acc64.hessian, acc64.hessian)


def test_the_factorisation_happens_in_the_built_copy():
    H = correlated_hessian(64, 3)
    built = []

    def build():
        built.append(H.clone())
        return built[-1]

    U, _, _, _ = damped_inverse_cholesky(build, 0.01)
    assert len(built) == 1 and U.data_ptr() == built[0].data_ptr()  # U lives in the copy: no second matrix
    assert torch.equal(U, inverse_cholesky(H, 0.01)[0])


def test_mirror_lower_copies_the_lower_triangle_up_across_blocks():
    from bpdq.solvers.hessian import _mirror_lower

    A = torch.randn(2100, 2100, generator=torch.Generator().manual_seed(0))  # two blocks of rows
    lower = A.tril().clone()
    _mirror_lower(A)
    assert torch.equal(A, A.T) and torch.equal(A.tril(), lower)

