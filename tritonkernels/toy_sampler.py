"""The fused toy sampler in Triton: one program per BLOCK points runs every step of the guided
Euler/Heun run — forward and input-gradient of both toy MLPs (4 hidden layers), guidance and
the solver update — with the tile's activations in registers.  Same math and arguments as the
C++ op fastguide::toy_sample (csrc/toy_sampler.cpp); CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# tl.dot needs >= 16 rows; on a GPU 64 points per program keep a [64×64] tile at 32 registers
# per thread (4 warps); the interpreter pays per program, so it takes bigger blocks.
BLOCK = 256 if INTERPRETED else 64
NUM_WARPS = 4
NUM_LAYERS = 4
SILU_SCALE = 0.596
# "ieee" keeps the float32 products exact enough for the 1e-4 contract; "tf32x3" is faster on
# tensor cores with nearly float32 accuracy, "tf32" is not accurate enough.
DOT_PRECISION = "ieee"


def pack_weights(weights):
    """One model's effective weights as a flat float32 buffer: w_0 [H×4]; for l = 1..3 the
    forward operand (w_l/0.596)ᵀ; for l = 1..3 the backward operand w_l/0.596; and the output
    layer's forward+backward folded into M = (w_out/0.596)ᵀ(w_out/0.596)."""
    scaled = [w.to(torch.float64) / SILU_SCALE for w in weights[1:]]
    hidden_layers, w_out = scaled[:-1], scaled[-1]
    parts = [weights[0].to(torch.float64)] + [w.t() for w in hidden_layers] + hidden_layers + [w_out.t() @ w_out]
    return torch.cat([p.reshape(-1) for p in parts]).to(torch.float32).contiguous()


@triton.jit
def _silu_and_slope(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _square(w_ptr, offset, H: tl.constexpr):
    rows = tl.arange(0, H)
    return tl.load(w_ptr + offset + rows[:, None] * H + rows[None, :])


@triton.jit
def _denoise(x0, x1, sigma, w_ptr, gain, sigma_data, H: tl.constexpr, PRECISION: tl.constexpr):
    """D(x) of one model at the scalar sigma for a block of points (x0, x1: [BLOCK])."""
    cols = tl.arange(0, H)
    c_in = 1.0 / tl.sqrt(sigma_data * sigma_data + sigma * sigma)
    w_x0 = c_in * tl.load(w_ptr + cols * 4)
    w_x1 = c_in * tl.load(w_ptr + cols * 4 + 1)
    bias = tl.load(w_ptr + cols * 4 + 2) * (tl.log(sigma) * 0.25) + tl.load(w_ptr + cols * 4 + 3)
    fwd = 4 * H
    bwd = fwd + 3 * H * H
    gram = bwd + 3 * H * H
    # forward: s_l = silu(z_l), slope_l = silu'(z_l)  (the 1/0.596 lives in the packed weights)
    z = x0[:, None] * w_x0[None, :] + x1[:, None] * w_x1[None, :] + bias[None, :]
    s, slope0 = _silu_and_slope(z)
    s, slope1 = _silu_and_slope(tl.dot(s, _square(w_ptr, fwd, H), input_precision=PRECISION))
    s, slope2 = _silu_and_slope(tl.dot(s, _square(w_ptr, fwd + H * H, H), input_precision=PRECISION))
    s, slope3 = _silu_and_slope(tl.dot(s, _square(w_ptr, fwd + 2 * H * H, H), input_precision=PRECISION))
    # backward of logp = gain·mean(y²)/σ − ½‖x·c_in‖² to the x features
    coef = 2.0 * gain / (H * sigma)
    g = coef * tl.dot(s, _square(w_ptr, gram, H), input_precision=PRECISION) * slope3
    g = tl.dot(g, _square(w_ptr, bwd + 2 * H * H, H), input_precision=PRECISION) * slope2
    g = tl.dot(g, _square(w_ptr, bwd + H * H, H), input_precision=PRECISION) * slope1
    g = tl.dot(g, _square(w_ptr, bwd, H), input_precision=PRECISION) * slope0
    c_in_sq = c_in * c_in
    score0 = tl.sum(g * w_x0[None, :], axis=1) - c_in_sq * x0
    score1 = tl.sum(g * w_x1[None, :], axis=1) - c_in_sq * x1
    sigma_sq = sigma * sigma
    return x0 + sigma_sq * score0, x1 + sigma_sq * score1


@triton.jit
def _guided_denoise(x0, x1, sigma, guided, guidance, main_ptr, main_gain, main_sigma_data, guide_ptr, guide_gain,
                    guide_sigma_data, HM: tl.constexpr, HG: tl.constexpr, PRECISION: tl.constexpr):
    d0, d1 = _denoise(x0, x1, sigma, main_ptr, main_gain, main_sigma_data, HM, PRECISION)
    if guided != 0:
        g0, g1 = _denoise(x0, x1, sigma, guide_ptr, guide_gain, guide_sigma_data, HG, PRECISION)
        d0 = g0 + guidance * (d0 - g0)
        d1 = g1 + guidance * (d1 - g1)
    return d0, d1


@triton.jit
def _toy_sampler_kernel(x_ptr, n, main_ptr, main_gain, main_sigma_data, guide_ptr, guide_gain, guide_sigma_data,
                        schedule_ptr, num_steps, guidance, HM: tl.constexpr, HG: tl.constexpr,
                        BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    x0 = tl.load(x_ptr + rows * 2, mask=mask, other=0.0)
    x1 = tl.load(x_ptr + rows * 2 + 1, mask=mask, other=0.0)
    for i in range(num_steps):
        t_hat = tl.load(schedule_ptr + i * 5)
        t_next = tl.load(schedule_ptr + i * 5 + 1)
        guided_euler = tl.load(schedule_ptr + i * 5 + 2)
        guided_heun = tl.load(schedule_ptr + i * 5 + 3)
        heun = tl.load(schedule_ptr + i * 5 + 4)
        h = t_next - t_hat
        d0, d1 = _guided_denoise(x0, x1, t_hat, guided_euler, guidance, main_ptr, main_gain, main_sigma_data,
                                 guide_ptr, guide_gain, guide_sigma_data, HM, HG, PRECISION)
        deriv0 = (x0 - d0) / t_hat
        deriv1 = (x1 - d1) / t_hat
        euler0 = x0 + h * deriv0
        euler1 = x1 + h * deriv1
        if heun != 0:
            d0, d1 = _guided_denoise(euler0, euler1, t_next, guided_heun, guidance, main_ptr, main_gain,
                                     main_sigma_data, guide_ptr, guide_gain, guide_sigma_data, HM, HG, PRECISION)
            x0 = x0 + h * (0.5 * deriv0 + 0.5 * (euler0 - d0) / t_next)
            x1 = x1 + h * (0.5 * deriv1 + 0.5 * (euler1 - d1) / t_next)
        else:
            x0 = euler0
            x1 = euler1
    tl.store(x_ptr + rows * 2, x0, mask=mask)
    tl.store(x_ptr + rows * 2 + 1, x1, mask=mask)


def _check_model(name, weights):
    if len(weights) != NUM_LAYERS + 1:
        raise ValueError(f"{name}: the triton kernel needs {NUM_LAYERS + 1} weight matrices, got {len(weights)}")
    hidden = weights[0].shape[0]
    if hidden < 16 or hidden & (hidden - 1):
        raise ValueError(f"{name}: the triton kernel needs hidden a power of two >= 16, got {hidden}")
    return hidden


def toy_sample(x, main_weights, main_gain, main_sigma_data, guide_weights, guide_gain, guide_sigma_data, schedule,
               guidance, *, block=BLOCK, precision=DOT_PRECISION):
    """Same arguments as torch.ops.fastguide.toy_sample: x [N, 2] float32 (noise·t_0), the models'
    effective weights, gains and sigma_data (guide_weights empty when no step is guided), schedule
    [steps, 5] rows (t_hat, t_next, guided_euler, guided_heun, heun).  Returns the sampled x."""
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be a float32 tensor of shape [N, 2], got {x.dtype} {tuple(x.shape)}")
    hidden_main = _check_model("main", main_weights)
    schedule = schedule.to(device=x.device, dtype=torch.float32).contiguous()
    if bool(schedule[:, 2:4].any()) and not guide_weights:
        raise ValueError("guided steps need guide weights")
    main_packed = pack_weights(main_weights)
    if guide_weights:
        hidden_guide = _check_model("guide", guide_weights)
        guide_packed = pack_weights(guide_weights)
    else:  # never read: no step is guided
        hidden_guide, guide_packed, guide_gain, guide_sigma_data = hidden_main, main_packed, 0.0, 1.0
    out = x.contiguous().clone()
    n = out.shape[0]
    _toy_sampler_kernel[(triton.cdiv(n, block),)](
        out, n, main_packed, float(main_gain), float(main_sigma_data), guide_packed, float(guide_gain),
        float(guide_sigma_data), schedule, schedule.shape[0], float(guidance), HM=hidden_main, HG=hidden_guide,
        BLOCK=block, PRECISION=precision, num_warps=NUM_WARPS)
    return out
