"""The "cpp" backend of the toy_sample family: the fused C++ op fastguide_toy::sample."""
import torch

import fastguide.toy._C  # noqa: F401  (registers torch.ops.fastguide_toy.*)
from fastguide.toy.fused import kernel_arguments


def run(main, guide, noise, t_steps, guidance, guidance_interval, solver):
    """The toy_sample family's entry (see fastguide.toy.fused.sample_toy)."""
    return torch.ops.fastguide_toy.sample(*kernel_arguments(main, guide, noise, t_steps, guidance,
                                                            guidance_interval, solver))
