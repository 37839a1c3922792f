"""fastguide: kernel-backed guided diffusion sampling (CFG, autoguidance, guidance interval)."""
from fastguide import ops
from fastguide.dispatch import backends
from fastguide.guidance import DenoiserOutputError, GuidedDenoiser
from fastguide.noise import SeededRandn, seeded_noise, seeded_randn_like
from fastguide.sampler import edm_sampler, sample

__version__ = "0.1.0"
__all__ = ["sample", "edm_sampler", "GuidedDenoiser", "DenoiserOutputError", "seeded_noise",
           "seeded_randn_like", "SeededRandn", "backends", "ops"]
