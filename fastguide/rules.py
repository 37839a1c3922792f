"""Guidance rules: how the two predictions combine into the guided D, beyond D0 + w·(D1 − D0).

    Lerp()                                        D0 + w·(D1 − D0), the default
    CFGRescale(phi=0.7, space="eps")              Lin et al. 2023 (diffusers' guidance_rescale)
    APG(eta=1.0, norm_threshold=0.0, momentum=0.0, space="eps")   Sadat et al. 2024
    CFGZeroStar(zero_init_steps=0, space="eps")   Fan et al. 2025

Semantics are those of diffusers' guiders with use_original_formulation=False (ClassifierFree-
Guidance with guidance_rescale, AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance), with
D1 the conditional (or stronger) prediction and D0 the unconditional (or weaker guide's) one, so
they apply to autoguidance as well as CFG.  Every reduction is per sample, over all non-batch
dimensions.  A weight w may be one number or a tensor [B] (one weight per sample); a sample whose
weight is 1 gets D1 (and, for APG, keeps its momentum), as a guider with guidance_scale=1 does.

space: which prediction a rule acts on.  "x0": the denoiser output D; "eps": (x − D)/σ in the
sampler's variables (ε of a diffusion model, the velocity of a flow-matching model sampled in t);
"v": a VP model's v-prediction, (ε − σD)/√(1 + σ²).  Each is affine in (x, D) per noise level:
conv(D) = a_x·x + a_d·D (space_coefficients), so the rule converts both predictions, combines
them, and converts back.

How the fused path works (fastguide.core runs it; the kernels know nothing of rules).  In its
space every rule's output is, per sample b, an affine combination out = p_b·a + q_b·δ + r_b·m of
a = conv(D1), δ = conv(D1) − conv(D0) = a_d·(D1 − D0) and APG's momentum state m, with p, q, r
functions of a few per-sample sums.  Pass 1 (rule_moments) reads the predictions once and sums,
per sample, two "streams" e1, e2 (each affine in x, D1, D1 − D0, m; see Rule.streams): Σe1, Σe2,
Σe1², Σe1·e2, Σe2².  Rule.combine turns those sums into (p, q, r) with [B]-sized tensor math on the
device (no host read), and pass 2 (rule_apply) applies the rule fused with the solver update and
writes APG's new momentum.  The plain formulas (Rule.reference, reference_guide) are what the tests
compare everything against, and diffusers' guiders what they compare those against.
"""
import math
import numbers

import torch

from fastguide import dispatch, ops

SPACES = ("x0", "eps", "v")
NORMALIZE_EPS = 1e-12    # torch.nn.functional.normalize's floor on the norm (APG's projection)
ZERO_STAR_EPS = 1e-8     # added to ‖D0‖² in CFG-Zero*'s optimised scale

dispatch.register_family(
    "rules", modules={"reference": "fastguide._rules_ops", "cpp": "fastguide._rules_ext",
                      "cuda": "fastguide._rules_ext", "triton": "tritonkernels.guided_rules"},
    extension="fastguide._C", ops=("fastguide::rule_moments", "fastguide::rule_apply"))


# ---------------------------------------------------------------------------------------------
# Validation


def check_space(space):
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return space


def check_guidance(guidance, argument="guidance"):
    """guidance as a float, or as a float64 CPU tensor [B] (one weight per sample): real, finite."""
    if isinstance(guidance, torch.Tensor):
        if guidance.dtype == torch.bool or guidance.is_complex() or not (
                guidance.is_floating_point() or guidance.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{argument} must be a real number or a real tensor [B], got dtype {guidance.dtype}")
        if guidance.ndim == 0:
            return check_guidance(guidance.item(), argument)
        if guidance.ndim != 1 or guidance.numel() < 1:
            raise ValueError(f"{argument} must be a number or a 1-D tensor [B] (one weight per sample), "
                             f"got shape {tuple(guidance.shape)}")
        weights = guidance.detach().to("cpu", torch.float64).clone()
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{argument} must be finite; the tensor holds NaN or inf")
        return weights
    return ops.check_real(argument, guidance)


def check_guidance_batch(guidance, batch, argument="guidance"):
    if isinstance(guidance, torch.Tensor) and guidance.numel() != batch:
        raise ValueError(f"{argument} holds {guidance.numel()} weights; expected one per sample ({batch})")


def all_one(guidance):
    """Whether every weight is 1 (then the guide is skipped)."""
    if isinstance(guidance, torch.Tensor):
        return bool((guidance == 1).all())
    return guidance == 1


def _check_number(name, value, *, minimum=None, strict=False):
    return ops.check_real(name, value, minimum=minimum, strict=strict)


# ---------------------------------------------------------------------------------------------
# Spaces


def space_coefficients(space, sigma):
    """(a_x, a_d) with conv(D) = a_x·x + a_d·D at noise level sigma > 0 (Python floats)."""
    if space == "x0":
        return 0.0, 1.0
    if space == "eps":
        return 1.0 / sigma, -1.0 / sigma
    root = math.sqrt(1.0 + sigma * sigma)     # "v": (ε − σD)/√(1+σ²) with ε = (x − D)/σ
    return 1.0 / (sigma * root), -root / sigma


def to_space(space, x, d, sigma):
    """The prediction d (x0) in `space` at noise level sigma (plain PyTorch)."""
    if space == "x0":
        return d
    if space == "eps":
        return (x - d) / sigma
    return ((x - d) / sigma - sigma * d) / math.sqrt(1.0 + sigma * sigma)


def from_space(space, x, out, sigma):
    """The D whose conversion to `space` is out (inverse of to_space)."""
    if space == "x0":
        return out
    if space == "eps":
        return x - sigma * out
    a_x, a_d = space_coefficients(space, sigma)
    return (out - a_x * x) / a_d


# ---------------------------------------------------------------------------------------------
# Rules


def _sample_dims(t):
    return tuple(range(1, t.ndim))


def _per_sample(w, t):
    """A weight (float or [B] tensor) broadcastable against t [B, ...]."""
    if isinstance(w, torch.Tensor):
        return w.to(t.device, t.dtype).reshape(-1, *[1] * (t.ndim - 1))
    return w


def _cond_where_weight_is_one(w, cond, out):
    """A sample whose weight is 1 gets the conditional prediction exactly, as a diffusers guider at scale 1."""
    if isinstance(w, torch.Tensor):
        return torch.where(w == 1, cond, out)
    return cond if w == 1 else out


class Rule:
    """A guidance rule.  Subclasses define reference (the plain formula), streams and combine."""
    name = ""
    space = "x0"
    needs_moments = True        # pass 1 runs (False: p, q, r follow from w alone)
    momentum = 0.0              # APG's momentum (a state m lives for one run when != 0)
    zero_init_steps = 0         # CFG-Zero*: the first steps give a zero prediction

    @property
    def stateful(self):
        return self.momentum != 0

    def params(self):
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other):
        return type(self) is type(other) and self.params() == other.params()

    def __hash__(self):
        return hash((type(self), tuple(self.params().items())))

    def reference(self, cond, uncond, w, momentum=None):
        """The guided prediction from cond = conv(D1) and uncond = conv(D0) (tensors [B, ...] in the
        rule's space), plain PyTorch, like the diffusers guider's forward.  Returns (pred, momentum)."""
        raise NotImplementedError

    def streams(self, a_x, a_d, w):
        """The two summed streams as coefficients [B, 2, 4] (float64) on (x, D1, D1 − D0, m)."""
        raise NotImplementedError

    def combine(self, sums, n, w):
        """(p, q, r) [B] float64 from sums [B, 5] = (Σe1, Σe2, Σe1², Σe1·e2, Σe2²) over n elements."""
        raise NotImplementedError


class Lerp(Rule):
    """D0 + w·(D1 − D0) (the same in every space)."""
    name = "lerp"
    needs_moments = False

    def reference(self, cond, uncond, w, momentum=None):
        return uncond + _per_sample(w, cond) * (cond - uncond), momentum

    def combine(self, sums, n, w):
        return torch.ones_like(w), w - 1, torch.zeros_like(w)


def _stream(a_x, a_d, w, x=0.0, d1=0.0, delta=0.0, m=0.0):
    """One stream's [B, 4] coefficients: x·(x, D1 coefficient of conv) etc., broadcast over w's batch."""
    parts = [torch.as_tensor(c, dtype=torch.float64, device=w.device).expand(w.shape) for c in (x, d1, delta, m)]
    return torch.stack(parts, dim=-1)


def _conv_stream(a_x, a_d, w, delta=0.0, m=0.0):
    """conv(D1) + delta·(D1 − D0) + m·m: coefficients on (x, D1, D1 − D0, m)."""
    return _stream(a_x, a_d, w, a_x, a_d, delta, m)


class CFGRescale(Rule):
    """CFG, then Lin et al.'s rescale: pred = D0 + w·(D1 − D0) in `space`, rescaled towards
    std(cond)/std(pred) (standard deviations per sample, Bessel-corrected) by phi."""
    name = "cfg_rescale"

    def __init__(self, phi=0.7, space="eps"):
        self.phi = _check_number("phi", phi, minimum=0.0)
        self.space = check_space(space)

    def params(self):
        return dict(phi=self.phi, space=self.space)

    def reference(self, cond, uncond, w, momentum=None):
        w = _per_sample(w, cond)
        pred = uncond + w * (cond - uncond)
        dims = _sample_dims(cond)
        n = cond[0].numel()

        def std(t):
            centred = t - t.mean(dim=dims, keepdim=True)
            return (centred.square().sum(dim=dims, keepdim=True) / (n - 1)).sqrt()
        scale = self.phi * (std(cond) / std(pred)) + (1 - self.phi)
        out = scale * pred
        return _cond_where_weight_is_one(w, cond, out), momentum

    def streams(self, a_x, a_d, w):
        return torch.stack([_conv_stream(a_x, a_d, w), _conv_stream(a_x, a_d, w, delta=(w - 1) * a_d)], dim=1)

    def combine(self, sums, n, w):
        def variance(total, squares):
            return ((squares - total * total / n) / (n - 1)).clamp_min(0)
        ratio = (variance(sums[:, 0], sums[:, 2]) / variance(sums[:, 1], sums[:, 4])).sqrt()
        scale = self.phi * ratio + (1 - self.phi)
        return scale, scale * (w - 1), torch.zeros_like(w)


class APG(Rule):
    """Adaptive projected guidance: the update Δ = D1 − D0 (in `space`) accumulated with momentum
    (m ← Δ + momentum·m, per run), scaled down to norm ≤ norm_threshold (when > 0), split into
    parts parallel and orthogonal to the conditional prediction, the parallel part scaled by eta:
    pred = D0 + w·(orthogonal + eta·parallel).  The momentum updates at every guided evaluation
    (as each call of the diffusers guider does; twice per Heun step) and not where a sample's
    weight is 1 or the guide is skipped."""
    name = "apg"

    def __init__(self, eta=1.0, norm_threshold=0.0, momentum=0.0, space="eps"):
        self.eta = _check_number("eta", eta)
        self.norm_threshold = _check_number("norm_threshold", norm_threshold, minimum=0.0)
        momentum = _check_number("momentum", momentum)
        if not -1 < momentum < 1:
            raise ValueError(f"momentum must lie in (-1, 1), got {momentum}")
        self.momentum = momentum
        self.space = check_space(space)

    def params(self):
        return dict(eta=self.eta, norm_threshold=self.norm_threshold, momentum=self.momentum, space=self.space)

    def reference(self, cond, uncond, w, momentum=None):
        w = _per_sample(w, cond)
        dims = _sample_dims(cond)
        update = cond - uncond
        if momentum is not None:
            update = update + self.momentum * momentum
        new_momentum = update if self.momentum != 0 else None
        if self.norm_threshold > 0:
            norm = update.square().sum(dim=dims, keepdim=True).sqrt()
            update = update * torch.clamp(self.norm_threshold / norm, max=1.0)
        v0, v1 = update.double(), cond.double()
        v1 = v1 / v1.square().sum(dim=dims, keepdim=True).sqrt().clamp_min(NORMALIZE_EPS)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        orthogonal = v0 - parallel
        update = (orthogonal.to(cond.dtype) + self.eta * parallel.to(cond.dtype))
        out = uncond + w * update
        if isinstance(w, torch.Tensor):
            one = w == 1
            out = torch.where(one, cond, out)
            if new_momentum is not None:
                new_momentum = torch.where(one, torch.zeros_like(cond) if momentum is None else momentum,
                                           new_momentum)
        elif w == 1:
            return cond, momentum
        return out, new_momentum

    def streams(self, a_x, a_d, w):
        return torch.stack([_conv_stream(a_x, a_d, w), _stream(a_x, a_d, w, delta=a_d, m=self.momentum)], dim=1)

    def combine(self, sums, n, w):
        if self.norm_threshold > 0:
            scale = torch.clamp(self.norm_threshold / sums[:, 4].sqrt(), max=1.0)
        else:
            scale = torch.ones_like(w)
        along = sums[:, 3] / sums[:, 2].sqrt().clamp_min(NORMALIZE_EPS).square()
        ws = w * scale
        return 1 + ws * (self.eta - 1) * along, ws - 1, ws * self.momentum


class CFGZeroStar(Rule):
    """CFG-Zero*: the unconditional prediction scaled by the optimised per-sample scale
    s* = ⟨cond, uncond⟩ / (‖uncond‖² + 1e-8), then CFG; a zero prediction (in `space`) on the
    first zero_init_steps sampler steps (where neither model's output matters; the guide is skipped)."""
    name = "cfg_zero_star"

    def __init__(self, zero_init_steps=0, space="eps"):
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, numbers.Integral) \
                or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an integer >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = int(zero_init_steps)
        self.space = check_space(space)

    def params(self):
        return dict(zero_init_steps=self.zero_init_steps, space=self.space)

    def reference(self, cond, uncond, w, momentum=None):
        w = _per_sample(w, cond)
        dims = _sample_dims(cond)
        cdt = _compute_dtype(cond.dtype)   # the scale in float32 (float64 for float64 predictions)
        c, u = cond.to(cdt), uncond.to(cdt)
        alpha = (c * u).sum(dim=dims, keepdim=True) / (u.square().sum(dim=dims, keepdim=True) + ZERO_STAR_EPS)
        scaled = uncond * alpha.to(cond.dtype)
        out = scaled + w * (cond - scaled)
        return _cond_where_weight_is_one(w, cond, out), momentum

    def streams(self, a_x, a_d, w):
        return torch.stack([_conv_stream(a_x, a_d, w), _conv_stream(a_x, a_d, w, delta=-a_d)], dim=1)

    def combine(self, sums, n, w):
        alpha = sums[:, 3] / (sums[:, 4] + ZERO_STAR_EPS)
        return w + (1 - w) * alpha, (w - 1) * alpha, torch.zeros_like(w)


RULES = {cls.name: cls for cls in (Lerp, CFGRescale, APG, CFGZeroStar)}


def resolve(rule, argument="guidance_rule"):
    """A Rule from None (Lerp()), a Rule, or a name in RULES (default parameters)."""
    if rule is None:
        return Lerp()
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]()
    raise ValueError(f"{argument} must be None, a fastguide.rules rule (Lerp, CFGRescale, APG, CFGZeroStar) "
                     f"or one of the names {tuple(RULES)}, got {rule!r}")


def uses_rule_path(rule, guidance):
    """Whether a run needs the rule path (anything but Lerp with one scalar weight)."""
    return not (isinstance(rule, Lerp) and not isinstance(guidance, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# The plain reference of one guided evaluation


def reference_guide(rule, x, d_main, d_guide, guidance, sigma, step=0, momentum=None):
    """(D, momentum) of `rule` for predictions d_main (D1), d_guide (D0 or None where the guide is
    skipped) at noise level sigma, x the denoiser's input, in plain PyTorch in the tensors' dtype.
    step: the sampler step (CFG-Zero*'s zero init).  momentum: APG's state (None at the start)."""
    if step < rule.zero_init_steps:
        return from_space(rule.space, x, torch.zeros_like(d_main), sigma), momentum
    if d_guide is None:
        return d_main, momentum
    cond = to_space(rule.space, x, d_main, sigma)
    uncond = to_space(rule.space, x, d_guide, sigma)
    out, momentum = rule.reference(cond, uncond, guidance, momentum)
    return from_space(rule.space, x, out, sigma), momentum


# ---------------------------------------------------------------------------------------------
# The fused path: per-run state, coefficients, the two passes


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def solver_rows(ev):
    """The solver's update as affine rows over (x, D, E, noise): [(out row), (out2 row) or None],
    and κ with the evaluation's input x_in = x + κ·E.  E: Heun's deriv, DPM-Solver's previous D."""
    if ev.stage == "heun":
        h = ev.t_next - ev.t_cur
        c = 0.5 * h / ev.t_next
        return [(1 + c, -c, 0.5 * h + c * h, 0.0), None], h
    if ev.stage == "dpmpp_2m":
        x_coef, d_coef, prev_coef = ev.coefs
        return [(x_coef, d_coef, prev_coef, 0.0), (0.0, 1.0, 0.0, 0.0)], 0.0
    if ev.stage == "denoise":
        return [(0.0, 1.0, 0.0, 0.0), None], 0.0
    h, t = ev.t_next - ev.t_cur, ev.t_cur     # "euler", "ancestral"
    return [(1 + h / t, -h / t, 0.0, ev.noise_scale or 0.0), (1 / t, -1 / t, 0.0, 0.0)], 0.0


class RuleRun:
    """One run of a rule: the weights on the device and APG's momentum state (created here, dropped
    with the run).  epilogue() is the core's guided step for a rule; denoise() a direct evaluation."""

    def __init__(self, rule, guidance, rule_ops, device):
        self.rule, self.ops = rule, rule_ops
        self.scalar = not isinstance(guidance, torch.Tensor)
        self.guidance = guidance
        self.weights = None if self.scalar else guidance.to(device, torch.float64)
        self.momentum = None

    def _w(self, batch, device):
        if self.scalar:
            return torch.full((batch,), self.guidance, dtype=torch.float64, device=device)
        return self.weights

    def coefficients(self, sigma, step, x_in, d_main, d_guide):
        """(P, Q, X, R, momentum), [B] float64 tensors: D = P·D1 + Q·(D1 − D0) + X·x_in + R·m, and
        momentum = (m_delta, m_keep) with the new state m' = m_delta·(D1 − D0) + m_keep·m, or None
        when there is no state to write."""
        rule = self.rule
        a_x, a_d = space_coefficients(rule.space, sigma)
        batch, device = d_main.shape[0], d_main.device
        zeros = torch.zeros(batch, dtype=torch.float64, device=device)
        if step < rule.zero_init_steps:   # zero prediction in the space: D = −a_x·x/a_d
            return zeros, zeros, zeros - a_x / a_d, zeros, None
        w = self._w(batch, device)
        if rule.needs_moments:
            cdt = _compute_dtype(d_main.dtype)
            streams = rule.streams(a_x, a_d, w)
            if self.momentum is None:
                streams[..., 3] = 0
            sums = self.ops.rule_moments(x_in if a_x != 0 else None, d_main, d_guide, self.momentum,
                                         streams.to(cdt))
            p, q, r = rule.combine(sums, d_main[0].numel(), w)
        else:
            p, q, r = rule.combine(None, d_main[0].numel(), w)
        one = w == 1
        p, q, r = torch.where(one, 1.0, p), torch.where(one, 0.0, q), torch.where(one, 0.0, r)
        momentum = None
        if rule.stateful:
            keep = zeros if self.momentum is None else zeros + 1   # m' = m where w = 1 (no update)
            momentum = (torch.where(one, zeros, zeros + a_d), torch.where(one, keep, keep * rule.momentum))
        return p, q, (p - 1) * (a_x / a_d), r / a_d, momentum

    def _apply(self, ev, x, x_in, d_main, d_guide, e, noise, out, out2, flag):
        P, Q, X, R, momentum = self.coefficients(ev.sigma, ev.step, x_in, d_main, d_guide)
        rows, kappa = solver_rows(ev)
        coefs = torch.zeros(P.shape[0], 3, 6, dtype=torch.float64, device=P.device)
        for j, row in enumerate(rows):
            if row is None:
                continue
            alpha, beta, gamma, nu = row
            coefs[:, j, 0] = alpha + beta * X
            coefs[:, j, 1] = beta * P
            coefs[:, j, 2] = beta * Q
            coefs[:, j, 3] = beta * R
            coefs[:, j, 4] = gamma + beta * X * kappa
            coefs[:, j, 5] = nu
        m_out = None
        if momentum is not None:
            if self.momentum is None:
                self.momentum = torch.empty_like(d_main, memory_format=torch.contiguous_format)
                m_in = None
            else:
                m_in = self.momentum
            coefs[:, 2, 2], coefs[:, 2, 3] = momentum
            m_out = self.momentum
        else:
            m_in = None
        cdt = _compute_dtype(x.dtype)
        e = e if any(row is not None and row[2] != 0 for row in rows) or kappa != 0 else None
        # The kernels write contiguous outputs: a non-contiguous buffer (channels-last x) gets a copy.
        targets = [t if t is None or t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                   for t in (out, out2)]
        self.ops.rule_apply(x, d_main, d_guide, m_in, e, noise, coefs.to(cdt), out=targets[0], out2=targets[1],
                            m_out=m_out, flags=flag)
        for buffer, target in zip((out, out2), targets):
            if buffer is not target:
                buffer.copy_(target)

    def epilogue(self, solver_ops, ev, bufs, x_in, d_main, d_guide, flag, noise, plain_epilogue):
        """The guided step of evaluation ev into bufs (fastguide.core's buffers)."""
        if d_guide is None and ev.step >= self.rule.zero_init_steps:
            # The guide was skipped (every weight 1, or σ outside the interval): D = D1, today's path.
            return plain_epilogue(solver_ops, ev, bufs, d_main, None, 1.0, flag, noise)
        if ev.stage == "heun":
            self._apply(ev, bufs.x, x_in, d_main, d_guide, bufs.deriv, None, bufs.x_next, None, flag)
        elif ev.stage == "dpmpp_2m":
            self._apply(ev, bufs.x, x_in, d_main, d_guide, bufs.denoised, None, bufs.x_next, bufs.denoised, flag)
        else:
            self._apply(ev, bufs.x, x_in, d_main, d_guide, None, noise, bufs.x_next, bufs.deriv, flag)

    def denoise(self, x, d_main, d_guide, sigma, step):
        """The guided D of one direct evaluation (GuidedDenoiser.forward)."""
        if d_guide is None and step >= self.rule.zero_init_steps:
            return d_main
        ev = _DirectEvaluation(step=step, sigma=sigma)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._apply(ev, x, x, d_main, d_guide, None, None, out, None, None)
        return out


class _DirectEvaluation:
    stage = "denoise"

    def __init__(self, step, sigma):
        self.step, self.sigma = step, sigma


def rule_ops(backend, device):
    """The module of the "rules" ops for the backend name that runs the guided ops ("auto" or
    resolved): that backend's rule kernels where it has them, else what "auto" picks for device
    (a CUDA build without the rule kernels falls back to Triton, then to the reference)."""
    device = torch.device(device)
    if backend != "auto" and dispatch.backends("rules").get(backend, {}).get("available"):
        return dispatch.implementation(dispatch.resolve(backend, device, family="rules"), family="rules")
    return dispatch.implementation(dispatch.resolve("auto", device, family="rules"), family="rules")
