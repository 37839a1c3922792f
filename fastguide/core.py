"""The sampler core: one loop for every solver, executing a plan (fastguide.plan).

For each planned evaluation: churn noise if planned, the evaluator's two predictions, and the
solver's fused epilogue (guidance + update + history write in one pass) into buffers allocated
once.  Nothing is read back from the device per step: each epilogue ORs non-finite flags into
its own slot of a device buffer, read once at the end (and before a callback runs), which names
the model, the stage and the step that produced the first NaN or inf.
"""
import dataclasses

import torch

from fastguide import reference, rules
from fastguide.evaluator import DenoiserOutputError


@dataclasses.dataclass
class Buffers:
    """The run's state: x at the step's start, x_next, the Euler slope, DPM-Solver's previous D."""
    x: torch.Tensor
    x_next: torch.Tensor
    deriv: torch.Tensor | None
    denoised: torch.Tensor | None

    @classmethod
    def allocate(cls, x, solver):
        x_next = torch.empty_like(x)
        deriv = None if solver == "dpmpp_2m" else torch.empty_like(x)
        denoised = torch.empty_like(x) if solver == "dpmpp_2m" else None
        return cls(x, x_next, deriv, denoised)

    def swap(self):
        self.x, self.x_next = self.x_next, self.x


def epilogue(ops, ev, bufs, d_main, d_guide, guidance, flag, noise=None):
    """The fused guidance + solver update of evaluation `ev`, written into bufs."""
    if ev.stage == "heun":
        ops.guided_heun(bufs.x, bufs.deriv, d_main, d_guide, guidance, ev.t_cur, ev.t_next, out=bufs.x_next,
                        flags=flag)
    elif ev.stage == "dpmpp_2m":
        ops.guided_dpmpp_2m(bufs.x, d_main, d_guide, bufs.denoised, guidance, *ev.coefs, out=bufs.x_next,
                            denoised_out=bufs.denoised, flags=flag)
    else:  # "euler", "ancestral": Euler to t_next (σ_down), plus noise
        ops.guided_euler(bufs.x, d_main, d_guide, guidance, ev.t_cur, ev.t_next, out=bufs.x_next,
                         deriv_out=bufs.deriv, noise=noise, noise_scale=ev.noise_scale or 0.0, flags=flag)


def guided_step(evaluator, ops, ev, bufs, labels, guidance, flag, noise=None, rule_run=None):
    """One evaluation and its epilogue: what torch.compile(fullgraph=True) can capture whole.
    rule_run (fastguide.rules.RuleRun): a guidance rule other than Lerp with one scalar weight."""
    x_in = bufs.x_next if ev.stage == "heun" else bufs.x
    d_main, d_guide = evaluator.predictions(x_in, ev.sigma, labels, ev.guided)
    if rule_run is None:
        epilogue(ops, ev, bufs, d_main, d_guide, guidance, flag, noise)
    else:
        rule_run.epilogue(ops, ev, bufs, x_in, d_main, d_guide, flag, noise, epilogue)
    return d_main, d_guide


def run(plan, evaluator, x, labels, guidance, ops, *, randn=None, callback=None, progress=False, check_finite=True,
        rule=None, rule_ops=None):
    """Executes `plan` from x (the noised start, owned by the run) and returns the final x.

    randn(x, step) draws churn and ancestral noise like x; callback(info) runs after each step with
    info = dict(i, sigma, sigma_hat, sigma_next, x: the new x, x_hat: x at σ̂ before the step,
    denoised: the step's guided D); x and x_hat are the run's buffers: clone them to keep them.
    rule: a fastguide.rules rule (None: Lerp), run with the "rules" ops module rule_ops; guidance
    may then be a float64 tensor [B] of per-sample weights.  The rule's state (APG's momentum)
    lives for this run only."""
    bufs = Buffers.allocate(x, plan.solver)
    rule_run = None
    if rule is not None and rules.uses_rule_path(rule, guidance):
        rule_run = rules.RuleRun(rule, guidance, rule_ops, x.device)
    flags = torch.zeros(len(plan.evaluations), dtype=torch.int32, device=x.device)
    bar = _progress_bar(plan.num_steps) if progress else None
    first_predictions = None
    try:
        with evaluator.run():
            for e, ev in enumerate(plan.evaluations):
                if ev.churn_std:
                    bufs.x.add_(randn(bufs.x, plan.steps[ev.step]), alpha=ev.churn_std)
                noise = randn(bufs.x, plan.steps[ev.step]) if ev.noise_scale is not None else None
                try:
                    predictions = guided_step(evaluator, ops, ev, bufs, labels, guidance, flags[e:e + 1], noise,
                                              rule_run)
                except DenoiserOutputError as exc:
                    raise DenoiserOutputError(f"{_where(ev)}: {exc}") from None
                if ev.stage != "heun":
                    first_predictions = predictions
                if not ev.last:
                    continue
                if callback is not None:
                    if check_finite:
                        raise_non_finite(plan, flags[:e + 1], evaluator)
                    callback(_step_info(plan.steps[ev.step], bufs, first_predictions, guidance, rule_run))
                bufs.swap()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if check_finite:
        raise_non_finite(plan, flags, evaluator)
    return bufs.x


def _where(ev):
    return f"step {ev.step} ({ev.stage} evaluation at sigma={ev.sigma:.6g})"


def raise_non_finite(plan, flags, evaluator):
    """Reads the flags (one device-to-host read) and names the first evaluation that went non-finite."""
    for e, bits in enumerate(flags.tolist()):
        if not bits:
            continue
        ev = plan.evaluations[e]
        for bit, name in ((1, evaluator.net_name), (2, evaluator.guide_name)):
            if bits & bit:
                raise DenoiserOutputError(f"{_where(ev)}: {name} returned non-finite values (NaN or inf)")
        raise FloatingPointError(f"step {ev.step}: x became non-finite (NaN or inf) from finite predictions; "
                                 "the values overflow the sampling dtype")


def _step_info(step, bufs, predictions, guidance, rule_run=None):
    """The callback's view of a finished step (before the buffers swap)."""
    if bufs.denoised is not None:
        denoised = bufs.denoised
    elif rule_run is not None:  # the fused rule path writes no D: recovered from deriv = (x − D)/σ̂
        denoised = bufs.x - step.sigma_hat * bufs.deriv
    else:
        denoised = reference.guide(*predictions, guidance)
    return dict(i=step.i, sigma=step.sigma, sigma_hat=step.sigma_hat, sigma_next=step.sigma_next,
                x=bufs.x_next, x_hat=bufs.x, denoised=denoised)


def _progress_bar(total):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="sampling", unit="step")
