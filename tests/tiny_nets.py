"""Tiny seeded denoiser modules for tests that trace or compile one step."""
import torch


class SigmaLinear(torch.nn.Module):
    """D = W·x / (1 + σ) with W, b drawn from torch's generator seeded with `seed`."""

    def __init__(self, seed, features=5):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(features, features)

    def forward(self, x, sigma, labels):
        return self.layer(x) / (1 + sigma[:, None])
