"""The fused toy sampler: the whole guided EDM run over a pair of ToyModels in one kernel.

sample_toy(main, guide, noise, ...) computes what
    fastguide.sample(main, noise, guide=guide, guidance=..., guidance_interval=..., solver=...)
computes (no churn, float32), but each tile of points runs every step — forward and
input-gradient of both MLPs, guidance, Euler and Heun update — inside one kernel.

The kernels are the toy's own family of fused ops, "toy_sample", registered with
fastguide.dispatch: "cpp" (fastguide/toy/csrc/sampler.cpp, op fastguide_toy::sample in the
extension fastguide.toy._C, CPU tensors), "triton" (fastguide/toy/triton_sampler.py, CUDA
tensors) and "reference" (fastguide.sample itself).  Each backend's module has one entry,
run(main, guide, noise, t_steps, guidance, guidance_interval, solver).
For classifier-free guidance on the toy, pass the unconditional ToyModel as the guide.
"""
import warnings

import torch

from fastguide import dispatch, reference
from fastguide.guidance import check_guidance, check_interval
from fastguide.sampler import EDM, schedule
from fastguide.toy import extension
from fastguide.toy.model import ToyModel

FAMILY = "toy_sample"
dispatch.register_family(FAMILY, modules={"reference": "fastguide.toy.reference_sampler",
                                          "cpp": "fastguide.toy.cpp_sampler",
                                          "triton": "fastguide.toy.triton_sampler"},
                         extension=extension.MODULE, ops=(f"{extension.NAMESPACE}::sample",))
BACKENDS = ("auto",) + dispatch.FAMILIES[FAMILY].names
SOLVERS = ("euler", "heun")  # what the fused kernels run
COLUMN_BLOCK = 16          # the C++ kernel's register block: hidden must be a multiple of it
TRITON_MIN_HIDDEN = 16     # tl.dot needs >= 16 along every dimension


def sample_toy(main, guide, noise, *, guidance=1.0, guidance_interval=None, num_steps=EDM["num_steps"],
               sigma_min=EDM["sigma_min"], sigma_max=EDM["sigma_max"], rho=EDM["rho"], sigmas=None, solver="heun",
               backend="auto"):
    """Samples [N, 2] float32 points from noise [N, 2] (any floating dtype, cast to float32) with
    the guided EDM sampler on toy models (no churn); the run starts at noise·sigma_max.

    D = D_guide + guidance·(D_main − D_guide) where lo < σ ≤ hi for guidance_interval = (lo, hi)
    (everywhere when None); elsewhere, and when guidance == 1, D = D_main and the guide is not run.
    solver: "euler" or "heun".  backend: "auto" (cpp on CPU, triton on CUDA), "cpp", "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1) or "reference" (fastguide.sample with the reference ops).
    """
    guidance = check_guidance(guidance)
    guidance_interval = check_interval(guidance_interval)
    _check_models(main, guide, guidance)
    _check_noise(noise)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    t_steps = schedule(num_steps, sigma_min, sigma_max, rho, sigmas)
    backend = _resolve(backend, noise.device, main, guide if guidance != 1 else None)
    return dispatch.implementation(backend, FAMILY).run(main, guide, noise, t_steps, guidance, guidance_interval,
                                                        solver)


def kernel_arguments(main, guide, noise, t_steps, guidance, guidance_interval, solver):
    """The fused kernels' arguments: (x = noise·t_0 in float32, main's weights, gain, sigma_data,
    the guide's (empty when no step is guided), the step table, guidance)."""
    steps = step_table(t_steps, guidance, guidance_interval, solver)
    guided = bool(steps[:, 2:4].any())
    x = noise.to(torch.float32) * t_steps[0]
    return (x, *_model_args(main, x.device), *_model_args(guide if guided else None, x.device), steps, guidance)


def step_table(t_steps, guidance, guidance_interval, solver):
    """Per step (t_hat, t_next, guided_euler, guided_heun, heun) as a [steps, 5] float64 tensor.

    No churn, so t_hat = t_cur; the Heun correction is skipped on the last step (t_next = 0)."""
    num_steps = len(t_steps) - 1
    rows = []
    for i in range(num_steps):
        t_hat, t_next = t_steps[i], t_steps[i + 1]
        heun = solver == "heun" and i < num_steps - 1
        guided_euler = guidance != 1 and reference.in_interval(t_hat, guidance_interval)
        guided_heun = heun and guidance != 1 and reference.in_interval(t_next, guidance_interval)
        rows.append((t_hat, t_next, float(guided_euler), float(guided_heun), float(heun)))
    return torch.tensor(rows, dtype=torch.float64)


def _check_models(main, guide, guidance):
    if not isinstance(main, ToyModel):
        raise TypeError(f"main must be a fastguide.toy.ToyModel, got {type(main).__name__}")
    if guide is not None and not isinstance(guide, ToyModel):
        raise TypeError(f"guide must be a fastguide.toy.ToyModel or None, got {type(guide).__name__}")
    if guidance != 1 and guide is None:
        raise ValueError(f"guidance={guidance} needs a guide model (the weak or unconditional ToyModel); got None")


def _check_noise(noise):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.ndim != 2 or noise.shape[1] != 2 or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape [N, 2] with N >= 1, got {tuple(noise.shape)}")


def _model_args(model, device):
    """(effective weights, gain, sigma_data) of a model for the kernels; empty for None."""
    if model is None:
        return [], 0.0, 0.5
    weights = [w.to(device) for w in model.effective_weights()]
    return weights, model.gain_value(), float(model.sigma_data)


def _kernel_support(backend, models):
    """Why the fused kernel of `backend` cannot run these models, or "" when it can."""
    for name, model in models.items():
        if model is None:
            continue
        if backend == "cpp" and model.hidden % COLUMN_BLOCK:
            return f"{name} has hidden={model.hidden}; the cpp kernel needs a multiple of {COLUMN_BLOCK}"
        if backend == "triton":
            hidden = model.hidden
            if hidden < TRITON_MIN_HIDDEN or hidden & (hidden - 1):
                return f"{name} has hidden={hidden}; the triton kernel needs a power of two >= {TRITON_MIN_HIDDEN}"
    return ""


def _resolve(backend, device, main, guide):
    """The backend that runs (chosen by fastguide.dispatch); one that cannot run these models is an
    error when requested, and makes "auto" fall back to the reference sampler with a warning."""
    dispatch.check_name(backend, family=FAMILY)
    if backend == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = dispatch.resolve(backend, device, FAMILY)
        reason = "; ".join(str(w.message) for w in caught) if chosen == "reference" else \
            _kernel_support(chosen, {"main": main, "guide": guide})
        if reason:
            warnings.warn(f"sample_toy: using the reference sampler ({reason})", RuntimeWarning, stacklevel=3)
            return "reference"
        return chosen
    chosen = dispatch.resolve(backend, device, FAMILY)
    reason = _kernel_support(chosen, {"main": main, "guide": guide})
    if reason:
        raise ValueError(f"backend {backend!r} cannot run: {reason}")
    return chosen
