"""The paper's 2D toy experiment: ground-truth mixture, models, training (fused sampler, metrics,
figures and demo live in their own modules of this package)."""
from fastguide.toy.mixture import GaussianMixture, tree_mixture
from fastguide.toy.model import ToyModel, load_model

__all__ = ["tree_mixture", "GaussianMixture", "ToyModel", "load_model"]
