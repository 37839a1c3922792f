"""The "reference" backend of the toy_sample family: fastguide.sample with the reference ops,
running the ToyModels themselves (autograd scores)."""
import torch

from fastguide.sampler import sample


def run(main, guide, noise, t_steps, guidance, guidance_interval, solver):
    """The toy_sample family's entry (see fastguide.toy.fused.sample_toy)."""
    return sample(main, noise, guide=guide, guidance=guidance, guidance_interval=guidance_interval,
                  sigmas=torch.tensor(t_steps, dtype=torch.float64), solver=solver, backend="reference")
