"""pytest-benchmark: the toy experiment's training hot spots, fused vs naive (see bench_toy_train.py)."""
import pytest
import torch

from fastguide.toy import train as T
from fastguide.toy.mixture import score_and_logp_reference, tree_mixture
from fastguide.toy.model import ToyModel


@pytest.fixture(scope="module")
def training_batch():
    mixture = tree_mixture("A")
    x, sigma, target = T.sample_batch(mixture, 4096, torch.Generator().manual_seed(0))
    return mixture, x, sigma, target


@pytest.mark.parametrize("variant", ["naive", "kernel"])
def test_bench_ground_truth_score(benchmark, training_batch, variant):
    mixture, x, sigma, _ = training_batch
    if variant == "naive":
        benchmark(lambda: score_and_logp_reference(x, sigma, *mixture.components(),
                                                   torch.float32))
    else:
        benchmark(lambda: mixture.score(x, sigma))


@pytest.mark.parametrize("variant", ["autograd", "hand"])
def test_bench_training_step(benchmark, training_batch, variant):
    _, x, sigma, target = training_batch
    torch.manual_seed(0)
    model = ToyModel(64, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))

    def autograd_step():
        optimizer.zero_grad(set_to_none=True)
        T.score_matching_loss(model, x, sigma, target).backward()
        optimizer.step()
        model.normalize_weights()

    benchmark(autograd_step if variant == "autograd" else lambda: T.training_step(model, optimizer, x, sigma, target))
