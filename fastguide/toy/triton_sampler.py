"""The fused toy sampler in Triton (the "triton" backend of the toy_sample family): one program
per BLOCK points runs every step of the guided Euler/Heun run — forward and input-gradient of
both toy MLPs, guidance and the solver update — with the tile's activations in registers (silu'
of the hidden layers in a per-program scratch).  Same math and arguments as the C++ op
fastguide_toy::sample (fastguide/toy/csrc/sampler.cpp); the guidance combination is the shared
jit helper of tritonkernels._common.  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl

from tritonkernels._common import guided_denoised

# tl.dot needs >= 16 rows; on a GPU 64 points per program keep a [64×64] tile at 32 registers
# per thread (4 warps).
BLOCK = 64
NUM_WARPS = 4
SILU_SCALE = 0.596
# tl.dot precision on a GPU: "tf32x3" runs on tensor cores with nearly float32 accuracy (three
# TF32 products); "ieee" (plain float32 FMAs) compiles ~30x slower into a huge kernel; "tf32"
# alone (10-bit mantissa) is too coarse for the 1e-4 contract.  The interpreter ignores it.
DOT_PRECISION = "tf32x3"


def pack_weights(weights):
    """One model's effective weights as a flat float32 buffer: w_0 [H×4]; for l = 1..L-1 the
    forward operand (w_l/0.596)ᵀ; for l = 1..L-1 the backward operand w_l/0.596; and the output
    layer's forward+backward folded into M = (w_out/0.596)ᵀ(w_out/0.596)."""
    scaled = [w.to(torch.float64) / SILU_SCALE for w in weights[1:]]
    hidden_layers, w_out = scaled[:-1], scaled[-1]
    parts = [weights[0].to(torch.float64)] + [w.t() for w in hidden_layers] + hidden_layers + [w_out.t() @ w_out]
    return torch.cat([p.reshape(-1) for p in parts]).to(torch.float32).contiguous()


def evaluation_table(schedule):
    """The step table [steps, 5] (t_hat, t_next, guided_euler, guided_heun, heun) as one row per
    model evaluation: (sigma, guided, starts_step, h = t_next − t_hat), float32 [evals, 4]."""
    rows = []
    for t_hat, t_next, guided_euler, guided_heun, heun in schedule.to(torch.float64).tolist():
        rows.append((t_hat, guided_euler, 1.0, t_next - t_hat))
        if heun:
            rows.append((t_next, guided_heun, 0.0, t_next - t_hat))
    return torch.tensor(rows, dtype=torch.float32)


@triton.jit
def _silu_and_slope(z):
    sig = 1.0 / (1.0 + tl.exp(-tl.maximum(z, -80.0)))  # exp(80) is finite: no overflow
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _square(w_ptr, offset, H: tl.constexpr):
    rows = tl.arange(0, H)
    return tl.load(w_ptr + offset + rows[:, None] * H + rows[None, :])


@triton.jit
def _denoise(x0, x1, sigma, w_ptr, gain, sigma_data, slopes_ptr, H: tl.constexpr, NUM_LAYERS: tl.constexpr,
             BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """D(x) of one model at the scalar sigma for a block of points (x0, x1: [BLOCK]).

    The layers run in loops (one dot per loop, a small kernel); silu'(z_l) of layers 1..L-1 is
    kept for the backward in the program's scratch block slopes_ptr [L-1, BLOCK, H]."""
    cols = tl.arange(0, H)
    tile = tl.arange(0, BLOCK)[:, None] * H + cols[None, :]
    c_in = 1.0 / tl.sqrt(sigma_data * sigma_data + sigma * sigma)
    w_x0 = c_in * tl.load(w_ptr + cols * 4)
    w_x1 = c_in * tl.load(w_ptr + cols * 4 + 1)
    bias = tl.load(w_ptr + cols * 4 + 2) * (tl.log(sigma) * 0.25) + tl.load(w_ptr + cols * 4 + 3)
    fwd = 4 * H
    bwd = fwd + (NUM_LAYERS - 1) * H * H
    gram = bwd + (NUM_LAYERS - 1) * H * H
    # forward: s_l = silu(z_l), slope_l = silu'(z_l)  (the 1/0.596 lives in the packed weights)
    s, slope0 = _silu_and_slope(x0[:, None] * w_x0[None, :] + x1[:, None] * w_x1[None, :] + bias[None, :])
    for l in range(NUM_LAYERS - 1):
        s, slope = _silu_and_slope(tl.dot(s, _square(w_ptr, fwd + l * H * H, H), input_precision=PRECISION))
        tl.store(slopes_ptr + l * BLOCK * H + tile, slope)
    tl.debug_barrier()  # the slopes are read back by other threads of the program
    # backward of logp = gain·mean(y²)/σ − ½‖x·c_in‖² to the x features
    g = (2.0 * gain / (H * sigma)) * tl.dot(s, _square(w_ptr, gram, H), input_precision=PRECISION)
    for i in range(NUM_LAYERS - 1):
        l = NUM_LAYERS - 2 - i
        g = g * tl.load(slopes_ptr + l * BLOCK * H + tile)
        g = tl.dot(g, _square(w_ptr, bwd + l * H * H, H), input_precision=PRECISION)
    tl.debug_barrier()  # before the next evaluation overwrites the slopes
    g = g * slope0
    c_in_sq = c_in * c_in
    score0 = tl.sum(g * w_x0[None, :], axis=1) - c_in_sq * x0
    score1 = tl.sum(g * w_x1[None, :], axis=1) - c_in_sq * x1
    sigma_sq = sigma * sigma
    return x0 + sigma_sq * score0, x1 + sigma_sq * score1


@triton.jit
def _guided_denoise(x0, x1, sigma, guided, guidance, main_ptr, main_gain, main_sigma_data, guide_ptr, guide_gain,
                    guide_sigma_data, slopes_ptr, HM: tl.constexpr, HG: tl.constexpr, LM: tl.constexpr,
                    LG: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    d0, d1 = _denoise(x0, x1, sigma, main_ptr, main_gain, main_sigma_data, slopes_ptr, HM, LM, BLOCK, PRECISION)
    if guided != 0:
        g0, g1 = _denoise(x0, x1, sigma, guide_ptr, guide_gain, guide_sigma_data, slopes_ptr, HG, LG, BLOCK,
                          PRECISION)
        d0 = guided_denoised(d0, g0, guidance)
        d1 = guided_denoised(d1, g1, guidance)
    return d0, d1


@triton.jit
def _toy_sampler_kernel(x_ptr, n, main_ptr, main_gain, main_sigma_data, guide_ptr, guide_gain, guide_sigma_data,
                        evals_ptr, num_evals, guidance, scratch_ptr, HM: tl.constexpr, HG: tl.constexpr,
                        LM: tl.constexpr, LG: tl.constexpr, SLOPES: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    slopes_ptr = scratch_ptr + pid * SLOPES  # this program's scratch: SLOPES floats
    x0 = tl.load(x_ptr + rows * 2, mask=mask, other=0.0)
    x1 = tl.load(x_ptr + rows * 2 + 1, mask=mask, other=0.0)
    # One loop over evaluations (so each model's code is emitted once).  An evaluation that
    # starts a step (Euler) takes the slope at x; a Heun one averages it with the slope at the
    # Euler point; either way the step's result so far is x_start + h·deriv.
    x_start0 = x0
    x_start1 = x1
    deriv0 = tl.zeros([BLOCK], tl.float32)
    deriv1 = tl.zeros([BLOCK], tl.float32)
    for e in range(num_evals):
        sigma = tl.load(evals_ptr + e * 4)
        guided = tl.load(evals_ptr + e * 4 + 1)
        first = tl.load(evals_ptr + e * 4 + 2) != 0
        h = tl.load(evals_ptr + e * 4 + 3)
        x_start0 = tl.where(first, x0, x_start0)
        x_start1 = tl.where(first, x1, x_start1)
        d0, d1 = _guided_denoise(x0, x1, sigma, guided, guidance, main_ptr, main_gain, main_sigma_data, guide_ptr,
                                 guide_gain, guide_sigma_data, slopes_ptr, HM, HG, LM, LG, BLOCK, PRECISION)
        deriv0 = tl.where(first, 0.0, 0.5 * deriv0) + tl.where(first, 1.0, 0.5) * ((x0 - d0) / sigma)
        deriv1 = tl.where(first, 0.0, 0.5 * deriv1) + tl.where(first, 1.0, 0.5) * ((x1 - d1) / sigma)
        x0 = x_start0 + h * deriv0
        x1 = x_start1 + h * deriv1
    tl.store(x_ptr + rows * 2, x0, mask=mask)
    tl.store(x_ptr + rows * 2 + 1, x1, mask=mask)


def _check_model(name, weights):
    """(hidden, hidden layers) of a model's effective weights [w_0, .., w_out]."""
    if len(weights) < 2:
        raise ValueError(f"{name}: expected at least 2 weight matrices (w_0 .. w_out), got {len(weights)}")
    hidden = weights[0].shape[0]
    if hidden < 16 or hidden & (hidden - 1):
        raise ValueError(f"{name}: the triton kernel needs hidden a power of two >= 16, got {hidden}")
    return hidden, len(weights) - 1


def toy_sample(x, main_weights, main_gain, main_sigma_data, guide_weights, guide_gain, guide_sigma_data, schedule,
               guidance, *, block=BLOCK, precision=DOT_PRECISION):
    """Same arguments as torch.ops.fastguide_toy.sample: x [N, 2] float32 (noise·t_0), the models'
    effective weights, gains and sigma_data (guide_weights empty when no step is guided), schedule
    [steps, 5] rows (t_hat, t_next, guided_euler, guided_heun, heun).  Returns the sampled x."""
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be a float32 tensor of shape [N, 2], got {x.dtype} {tuple(x.shape)}")
    hidden_main, layers_main = _check_model("main", main_weights)
    evals = evaluation_table(schedule).to(x.device)
    if bool(evals[:, 1].any()) and not guide_weights:
        raise ValueError("guided steps need guide weights")
    main_packed = pack_weights(main_weights)
    if guide_weights:
        hidden_guide, layers_guide = _check_model("guide", guide_weights)
        guide_packed = pack_weights(guide_weights)
    else:  # never read: no step is guided
        hidden_guide, layers_guide, guide_packed, guide_gain, guide_sigma_data = 16, 1, main_packed, 0.0, 1.0
    out = x.contiguous().clone()
    n = out.shape[0]
    programs = triton.cdiv(n, block)
    slopes_per_program = (max(layers_main, layers_guide) - 1) * block * max(hidden_main, hidden_guide)
    scratch = torch.empty(max(1, programs * slopes_per_program), device=x.device, dtype=torch.float32)
    _toy_sampler_kernel[(programs,)](
        out, n, main_packed, float(main_gain), float(main_sigma_data), guide_packed, float(guide_gain),
        float(guide_sigma_data), evals, evals.shape[0], float(guidance), scratch, HM=hidden_main, HG=hidden_guide,
        LM=layers_main, LG=layers_guide, SLOPES=slopes_per_program, BLOCK=block, PRECISION=precision,
        num_warps=NUM_WARPS)
    return out


def run(main, guide, noise, t_steps, guidance, guidance_interval, solver):
    """The toy_sample family's entry (see fastguide.toy.fused.sample_toy)."""
    from fastguide.toy.fused import kernel_arguments
    return toy_sample(*kernel_arguments(main, guide, noise, t_steps, guidance, guidance_interval, solver))
