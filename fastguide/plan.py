"""The plan of a sampler run, made of Python floats before the first model call.

A plan lists every model evaluation of the run: the step it belongs to, the noise level the
denoiser sees, whether the guide runs there, and the scalars of the fused epilogue that follows it
(which kernel, its coefficients, the noise it adds).  The core loop (fastguide.core) executes it
without reading anything back from the device.

Solvers (k-diffusion's names and formulas, Karras et al. 2022 for Euler/Heun with churn):
  "euler"            one evaluation per step, deriv = (x − D)/σ̂, x += (σ_next − σ̂)·deriv
  "heun"             Euler, then a correction evaluated at σ_next (skipped on a step to σ = 0)
  "dpmpp_2m"         DPM-Solver++(2M) (Lu et al. 2022): one evaluation per step, second order from
                     the previous step's D (first order on the first step and on a step to 0)
  "euler_ancestral"  Euler to σ_down, then σ_up·S_noise·randn where σ_next > 0 (eta scales σ_up)
"""
import dataclasses
import math

from fastguide import reference

SOLVERS = ("euler", "heun", "dpmpp_2m", "euler_ancestral")
EDM_DEFAULTS = reference.EDM_DEFAULTS
MAX_STEPS = 100_000


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One model evaluation and the fused epilogue that consumes it."""
    step: int              # the sampler step i
    stage: str             # the epilogue: "euler", "heun", "dpmpp_2m" or "ancestral"
    sigma: float           # the noise level the denoiser sees
    guided: bool           # whether the guide runs (False: w = 1 or σ outside the interval)
    t_cur: float           # the step's start, after churn (σ̂)
    t_next: float          # where the step's update goes (σ_down for ancestral)
    churn_std: float = 0.0            # std of the churn noise added to x before this evaluation
    noise_scale: float | None = None  # ancestral: σ_up·S_noise; None: no noise is drawn
    coefs: tuple = ()                 # dpmpp_2m: (x_coef, d_coef, prev_coef)
    last: bool = True                 # the step's last evaluation: its x_next is the step's result


@dataclasses.dataclass(frozen=True)
class Step:
    """What a callback is told of step i: σ_i, σ̂ (after churn) and σ_{i+1}."""
    i: int
    sigma: float
    sigma_hat: float
    sigma_next: float


@dataclasses.dataclass(frozen=True)
class Plan:
    sigmas: tuple          # σ_0 > σ_1 > ... > σ_N (σ_N = 0 for fastguide.sample)
    solver: str
    evaluations: tuple     # Evaluation, in order
    steps: tuple           # Step, one per sampler step

    @property
    def num_steps(self):
        return len(self.sigmas) - 1


def build(sigmas, solver, guided_at, *, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0, eta=1.0,
          guide_from_step=0, signal_scale=None):
    """The plan for a validated schedule `sigmas` (floats) and solver; guided_at(σ) says whether
    the guide runs at noise level σ, and it never runs before step guide_from_step (a guidance rule
    that ignores the predictions there: CFG-Zero*'s zero init).  Churn (S_*) applies to Euler and
    Heun only.  signal_scale(σ): α of x_σ = α·x0 + σ·ε (None: 1), which DPM-Solver++(2M)'s
    coefficients depend on (Euler and Heun solve the same ODE whatever α is)."""
    num_steps = len(sigmas) - 1
    evaluations, steps = [], []
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = reference.churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
        t_hat = t_cur + gamma * t_cur
        churn_std = math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise if gamma > 0 else 0.0
        steps.append(Step(i, t_cur, t_hat, t_next))
        step_guided_at = guided_at if i >= guide_from_step else _never
        evaluations += _step_evaluations(solver, i, sigmas, t_hat, churn_std, step_guided_at, S_noise, eta,
                                         signal_scale)
    return Plan(tuple(sigmas), solver, tuple(evaluations), tuple(steps))


def _never(sigma):
    return False


def _step_evaluations(solver, i, sigmas, t_hat, churn_std, guided_at, S_noise, eta, signal_scale):
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    if solver == "dpmpp_2m":
        coefs = reference.dpmpp_2m_coefficients(sigmas[i - 1] if i > 0 else None, t_cur, t_next, signal_scale)
        return [Evaluation(i, "dpmpp_2m", t_cur, guided_at(t_cur), t_cur, t_next, coefs=coefs)]
    if solver == "euler_ancestral":
        sigma_down, sigma_up = reference.ancestral_step(t_cur, t_next, eta)
        noise_scale = sigma_up * S_noise if t_next > 0 else None
        return [Evaluation(i, "ancestral", t_cur, guided_at(t_cur), t_cur, sigma_down, noise_scale=noise_scale)]
    heun = solver == "heun" and t_next > 0
    euler = Evaluation(i, "euler", t_hat, guided_at(t_hat), t_hat, t_next, churn_std=churn_std, last=not heun)
    if not heun:
        return [euler]
    return [euler, Evaluation(i, "heun", t_next, guided_at(t_next), t_hat, t_next)]

