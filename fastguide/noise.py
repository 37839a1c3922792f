"""Per-seed noise: sample k depends only on seed k, whatever batch or process draws it."""
import numbers

import torch


SEED_LIMIT = 2 ** 32  # torch's CPU generator keeps the low 32 bits of a seed: 5 and 5 + 2**32 draw alike


def _seed_list(seeds):
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seeds must be integers in [0, 2**32) (a generator keeps 32 bits of a seed), "
                             f"got {seed!r}")
    return [int(s) for s in seeds]


class SeededRandn:
    """One torch.Generator per seed; randn_like(x) draws row k of x from generator k.

    Pass an instance as `randn_like=` to fastguide.sample to make churn noise per-seed too."""

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in _seed_list(seeds)]

    def randn(self, shape, dtype=torch.float32, device=None):
        device = self.device if device is None else torch.device(device)
        rows = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn_like(self, x):
        if x.shape[0] != len(self.generators):
            raise ValueError(f"x has batch {x.shape[0]}, expected one row per seed ({len(self.generators)})")
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)

    __call__ = randn_like


def seeded_noise(seeds, shape, *, device="cpu", dtype=torch.float32):
    """Standard normal noise of shape [len(seeds), *shape], row k drawn from torch.Generator(seed k)."""
    return SeededRandn(seeds, device).randn(shape, dtype=dtype)


def seeded_randn_like(seeds, device="cpu"):
    """A randn_like for fastguide.sample's churn noise, drawing row k from its own seed's generator."""
    return SeededRandn(seeds, device)
