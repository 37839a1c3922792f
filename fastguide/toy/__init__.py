"""The paper's 2D toy experiment in EDM2's setting: ground-truth mixtures (mixture), models
(model), training (train), the sampling protocol (protocol), the fused sampler and its kernels
(fused, csrc/, triton_sampler), metrics, figures and the demo, each in its own module."""
from fastguide.toy.mixture import GaussianMixture, tree_mixture
from fastguide.toy.model import ToyModel, load_model

__all__ = ["tree_mixture", "GaussianMixture", "ToyModel", "load_model"]
