import math

import pytest
import torch

from optcc.algorithms import metrics


def test_accuracy_perfect_and_chance():
    labels = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(labels, 10).float()
    assert metrics.accuracy(perfect, labels) == 1.0
    random = torch.randn(5000, 10, generator=torch.Generator().manual_seed(1))
    assert abs(metrics.accuracy(random, labels) - 0.1) < 0.02


def test_perplexity_uniform_is_vocab_size_and_perfect_is_one():
    targets = torch.randint(0, 256, (4, 50))
    assert metrics.perplexity(torch.zeros(4, 50, 256), targets) == pytest.approx(256, rel=1e-5)
    sure = torch.nn.functional.one_hot(targets, 256).float() * 100
    assert metrics.perplexity(sure, targets) == pytest.approx(1.0, abs=1e-6)


def test_fidelity_identical_and_negated():
    x = torch.randn(3, 4, 5)
    f = metrics.fidelity(x, x.clone(), logits=True)
    assert f["cosine_mean"] == pytest.approx(1.0) and f["max_abs_err"] == 0 and f["top1_agreement"] == 1.0
    g = metrics.fidelity(x, -x)
    assert g["cosine_min"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differs from the reference"):
        metrics.fidelity(x, x[:, :2])


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert metrics.mean_pool(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_neighbours_and_paraphrase_retrieval():
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.nn.functional.one_hot(groups, 3).float() + 0.01 * torch.randn(6, 3)
    assert metrics.paraphrase_retrieval(emb, groups) == 1.0
    assert metrics.neighbour_agreement(emb, emb) == 1.0
    shuffled = emb[torch.tensor([2, 4, 0, 5, 1, 3])]
    assert metrics.paraphrase_retrieval(shuffled, groups) == 0.0
