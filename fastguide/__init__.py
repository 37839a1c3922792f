"""fastguide: kernel-backed guided diffusion sampling (CFG, autoguidance, guidance interval)."""
from fastguide import ops
from fastguide.dispatch import backends
from fastguide.guidance import DenoiserOutputError, GuidedDenoiser
from fastguide.noise import SeededRandn, seeded_noise, seeded_randn_like
from fastguide.sampler import edm_sampler, sample
from fastguide import adapters, k_diffusion, rules  # noqa: E402  (submodules: fastguide.rules.APG, ...)

__version__ = "0.2.0"
__all__ = ["sample", "edm_sampler", "GuidedDenoiser", "DenoiserOutputError", "seeded_noise",
           "seeded_randn_like", "SeededRandn", "backends", "ops", "rules", "adapters", "k_diffusion"]
