"""Histogram k-means against scikit-learn's KMeans (the accuracy oracle) and its own
contracts: determinism, exactness on few distinct values, domains."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from excp.codec.kmeans import Domain, quantize

LINEAR = Domain()


def _mse(values: torch.Tensor, k: int, domain: Domain = LINEAR) -> float:
    q = quantize(values, k, domain)
    y = domain.forward(values.double().numpy())
    restored = domain.forward(q.codebook.double()[q.codes.long()].numpy())
    return float(((restored - y) ** 2).mean())


def _sklearn_mse(values: torch.Tensor, k: int, domain: Domain = LINEAR) -> float:
    y = domain.forward(values.double().numpy())[:, None]
    return KMeans(k, n_init=3, random_state=0).fit(y).inertia_ / len(y)


DISTRIBUTIONS = {
    "normal": lambda g: torch.randn(100_000, generator=g),
    "laplace": lambda g: torch.distributions.Laplace(0.0, 1.0).sample((100_000,)),
    "student_t3": lambda g: torch.distributions.StudentT(3.0).sample((100_000,)),
    "pruned_residual": lambda g: (lambda x: x[x.abs() > 1.2e-3])(torch.randn(300_000, generator=g) * 1e-3),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("k", [3, 15, 255])
def test_mse_within_two_percent_of_sklearn(name: str, k: int) -> None:
    torch.manual_seed(0)
    values = DISTRIBUTIONS[name](torch.Generator().manual_seed(0)).float()
    ours, oracle = _mse(values, k), _sklearn_mse(values, k)
    assert ours <= oracle * 1.02, f"{name} k={k}: ours {ours:.4g} vs sklearn {oracle:.4g}"


def test_log_domain_for_second_moments() -> None:
    v = (torch.rand(100_000, generator=torch.Generator().manual_seed(1)) ** 4) * 1e-6 + 1e-14
    domain = Domain("log")
    assert _mse(v, 15, domain) <= _sklearn_mse(v, 15, domain) * 1.02
    q = quantize(v, 15, domain)
    assert q.codebook.dtype == torch.float32
    assert bool((q.codebook > 0).all()), "log-domain codebook must never flush v to zero"
    assert float(q.codebook.min()) < 1e-10


def test_few_distinct_values_are_exact() -> None:
    values = torch.tensor([0.5, -1.25, 3.0, 0.5, 3.0, 1e-9])
    q = quantize(values, 15)
    assert torch.equal(q.codebook[q.codes.long()], values)


def test_deterministic_and_codes_are_nearest_centroid() -> None:
    values = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    a, b = quantize(values, 15), quantize(values.clone(), 15)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)
    distances = (values[:, None] - a.codebook[None, :]).abs()
    chosen = distances.gather(1, a.codes.long()[:, None])[:, 0]
    assert bool((chosen <= distances.min(dim=1).values + 1e-7).all())


def test_constant_and_empty_inputs() -> None:
    q = quantize(torch.full((10_000,), 0.25), 15)
    assert q.codebook.tolist() == [0.25] and int(q.codes.max()) == 0
    empty = quantize(torch.empty(0), 15)
    assert empty.codes.numel() == 0 and empty.codebook.numel() == 0


def test_bf16_input_is_clustered_in_float32() -> None:
    values = torch.randn(20_000, generator=torch.Generator().manual_seed(3)).bfloat16()
    q = quantize(values, 15)
    assert q.codebook.dtype == torch.float32
    assert np.isfinite(q.codebook.numpy()).all()
