"""The fused ops guided_euler (plain and ancestral), guided_heun and guided_dpmpp_2m: every backend
against float64 formulas written here.

Outputs are poisoned with NaN first (and non-contiguous outputs live inside a NaN-filled base
that must stay untouched outside the view).  Error bound per element: tol(dtype) × the float64
value of the same formula on absolute values (the size of the terms the kernel adds), plus the
rounding to the stored dtype: half an ulp of the result for float16/bfloat16 (round to nearest),
except one ulp for the Triton backend (the interpreter truncates bfloat16).  float32: 1e-6
relative to that size.  On top of that the C++ (and CUDA) kernels are checked bit for bit against
their float32 formula written here with torch ops (FMAs included), which for float16/bfloat16 is
rounded by torch's .to(dtype) (round to nearest even).
"""
import inspect
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastguide
from fastguide import dispatch, ops, reference
from fastguide._threads import torch_threads

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
GUIDANCES = (0.0, 1.0, 2.5, -0.7)
MATH_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-6, torch.bfloat16: 1e-6}
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
# One ulp of the stored result relative to its size: the Triton backend's allowance.
TRITON_STORAGE_ULP = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

# The step of each op: t_next of the ancestral step is σ_down, its noise scale σ_up (from σ 2.7 to 1.9).
T_CUR, T_NEXT = 2.7, 1.9
SIGMA_DOWN, SIGMA_UP = reference.ancestral_step(T_CUR, T_NEXT)
DPM_COEFS = reference.dpmpp_2m_coefficients(4.0, T_CUR, T_NEXT)  # (x_coef, d_coef, prev_coef), second order
OPS = ("euler", "ancestral", "heun", "dpmpp_2m")


CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")


def backend_cases():
    """(backend, device): the CPU backends always; triton on CUDA when there is a GPU."""
    return [pytest.param("reference", "cpu", id="reference"),
            pytest.param("cpp", "cpu", id="cpp"),
            pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
            pytest.param("cuda", "cuda", id="cuda", marks=CUDA_SKIP)]


BACKENDS = backend_cases()
# The compiled C++/CUDA kernels, whose float32 math is pinned bit for bit.
NATIVE_BACKENDS = [pytest.param("cpp", "cpu", id="cpp"), pytest.param("cuda", "cuda", id="cuda", marks=CUDA_SKIP)]


# ---- float64 statement of the math ----

def denoised64(d_main, d_guide, guidance):
    if d_guide is None:
        return d_main.double(), d_main.double().abs()
    main, guide = d_main.double(), d_guide.double()
    return guide + guidance * (main - guide), guide.abs() + abs(guidance) * (main.abs() + guide.abs())


def euler64(x, d_main, d_guide, guidance, t_cur, t_next, noise=None, noise_scale=0.0):
    """(x_next, deriv) in float64 and the size of their terms."""
    denoised, denoised_size = denoised64(d_main, d_guide, guidance)
    x64 = x.double()
    deriv = (x64 - denoised) / t_cur
    deriv_size = (x64.abs() + denoised_size) / t_cur
    step = t_next - t_cur
    x_next, x_next_size = x64 + step * deriv, x64.abs() + abs(step) * deriv_size
    if noise is not None:
        noise64 = noise.double()
        x_next, x_next_size = x_next + noise_scale * noise64, x_next_size + abs(noise_scale) * noise64.abs()
    return (x_next, x_next_size), (deriv, deriv_size)


def heun64(x, deriv, d_main, d_guide, guidance, t_cur, t_next):
    denoised, denoised_size = denoised64(d_main, d_guide, guidance)
    x64, deriv64 = x.double(), deriv.double()
    step = t_next - t_cur
    x_euler = x64 + step * deriv64
    deriv_next = (x_euler - denoised) / t_next
    deriv_next_size = (x64.abs() + abs(step) * deriv64.abs() + denoised_size) / t_next
    size = x64.abs() + abs(step) / 2 * (deriv64.abs() + deriv_next_size)
    return x64 + step / 2 * (deriv64 + deriv_next), size


def dpm64(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef):
    """(x_next, D) in float64 and the size of their terms; D_prev is not read when prev_coef == 0."""
    denoised, denoised_size = denoised64(d_main, d_guide, guidance)
    x64 = x.double()
    x_next, size = x_coef * x64 + d_coef * denoised, abs(x_coef) * x64.abs() + abs(d_coef) * denoised_size
    if prev_coef != 0:
        prev = denoised_prev.double()
        x_next, size = x_next + prev_coef * prev, size + abs(prev_coef) * prev.abs()
    return (x_next, size), (denoised, denoised_size)


def half_ulp(got64, dtype):
    """Half an ulp of each (nonzero) value stored in float16/bfloat16."""
    exponent = torch.frexp(got64)[1].double()
    return torch.where(got64 == 0, 0.0, torch.exp2(exponent - 2 - MANTISSA_BITS[dtype]))


def assert_matches(name, got, expected, backend="cpp"):
    want, size = expected
    assert got.dtype in DTYPES
    got64 = got.detach().to("cpu", torch.float64)
    want, size = want.cpu(), size.cpu()
    assert not torch.isnan(got64).any(), f"{name}: NaN left in the output (an element was not written)"
    bound = MATH_TOL[got.dtype] * size
    if got.dtype in HALF_DTYPES:
        if backend == "triton":
            bound = bound + TRITON_STORAGE_ULP[got.dtype] * want.abs()
        else:
            bound = bound + half_ulp(got64, got.dtype)
        bound = bound + torch.finfo(got.dtype).smallest_normal * 2.0 ** -10  # subnormal results
    err = (got64 - want).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"at {worst} (got {got64.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r})")


# ---- the kernels' float32 formulas, exactly ----

def fma32(a, b, c):
    """a·b + c of float32 tensors rounded once to float32, as an FMA instruction does.  In float64
    the product is exact; the sum's rounding error comes exactly from TwoSum, and the sum rounded
    to odd (53 bits) then rounds to float32 (24 bits) correctly."""
    a, b, c = (torch.as_tensor(t, dtype=torch.float32).double() for t in (a, b, c))
    product = a * b
    total = product + c
    virtual = total - product
    error = (product - (total - virtual)) + (c - virtual)
    even = (total.view(torch.int64) & 1) == 0
    toward = torch.where(error > 0, math.inf, -math.inf)
    total = torch.where((error != 0) & even, torch.nextafter(total, toward), total)
    return total.float()


def f32(value):
    return torch.tensor(value, dtype=torch.float32)


def denoised32(d_main, d_guide, guidance):
    main = d_main.float()
    return main if d_guide is None else fma32(f32(guidance), main - d_guide.float(), d_guide.float())


def euler32(x, d_main, d_guide, guidance, t_cur, t_next, noise=None, noise_scale=0.0):
    x32 = x.float()
    deriv = (x32 - denoised32(d_main, d_guide, guidance)) * f32(1.0 / t_cur)
    x_next = fma32(f32(t_next - t_cur), deriv, x32)
    if noise is not None:
        x_next = fma32(f32(noise_scale), noise.float(), x_next)
    return x_next, deriv


def heun32(x, deriv, d_main, d_guide, guidance, t_cur, t_next):
    x32, deriv32 = x.float(), deriv.float()
    step = t_next - t_cur
    x_euler = fma32(f32(step), deriv32, x32)
    deriv_sum = fma32(x_euler - denoised32(d_main, d_guide, guidance), f32(1.0 / t_next), deriv32)  # deriv + deriv'
    return fma32(f32(0.5 * step), deriv_sum, x32)


def dpm32(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef):
    denoised = denoised32(d_main, d_guide, guidance)
    x_next = fma32(f32(d_coef), denoised, f32(x_coef) * x.float())
    if prev_coef != 0:
        x_next = fma32(f32(prev_coef), denoised_prev.float(), x_next)
    return x_next, denoised


INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(name, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    as_int = INT_OF_SIZE[got.element_size()]
    got_bits, want_bits = (t.detach().cpu().contiguous().view(-1).view(as_int) for t in (got, want))
    bad = (got_bits != want_bits).nonzero()
    assert not len(bad), (f"{name}: {len(bad)} elements differ, first at {int(bad[0])}: got "
                          f"{got.reshape(-1)[bad[0]].item()!r}, want {want.reshape(-1)[bad[0]].item()!r}")


# ---- inputs and poisoned outputs ----

LAYOUTS = {
    # name: (shape of the tensors, how a view of that shape is made from fresh storage)
    "size1": ((1,), None),
    "size7": ((7,), None),
    "batch1_image": ((1, 3, 5, 7), None),
    "transposed": ((13, 7), "transpose"),
    "strided": ((1001,), "every_other"),
}


def make_view(shape, layout, dtype, device, fill):
    """A tensor of `shape` in `layout`, from storage filled by fill(numel) (a float32 CPU tensor)."""
    if layout is None:
        return fill(math.prod(shape)).reshape(shape).to(device, dtype)
    if layout == "transpose":
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return fill(math.prod(shape)).reshape(swapped).to(device, dtype).transpose(-1, -2)
    if layout == "every_other":
        return fill(2 * shape[0]).to(device, dtype)[::2]
    raise ValueError(layout)


def random_input(generator, shape, layout, dtype, device, scale=1.0):
    return make_view(shape, layout, dtype, device, lambda n: scale * torch.randn(n, generator=generator))


def poisoned_output(shape, layout, dtype, device):
    return make_view(shape, layout, dtype, device, lambda n: torch.full((n,), float("nan")))


def base_of(view):
    """The whole storage behind a view (to check what lies outside it was not written)."""
    return torch.as_strided(view, (view.untyped_storage().nbytes() // view.element_size(),), (1,), 0)


def assert_untouched_outside(view, name):
    base = base_of(view)
    outside = torch.ones(base.shape, dtype=torch.bool, device=view.device)
    inside = torch.as_strided(outside, view.shape, view.stride(), view.storage_offset())
    inside.fill_(False)
    assert bool(torch.isnan(base[outside]).all()), f"{name}: wrote outside its view"


def inputs_for(generator, shape, layout, dtype, device, t_cur=T_CUR):
    x = random_input(generator, shape, layout, dtype, device, scale=t_cur)
    d_main = random_input(generator, shape, layout, dtype, device)
    d_guide = random_input(generator, shape, layout, dtype, device)
    deriv = random_input(generator, shape, layout, dtype, device)
    return x, d_main, d_guide, deriv


def all_inputs(generator, shape, layout, dtype, device):
    """Every input any op reads: x, d_main, d_guide, deriv, noise, prev (the previous D)."""
    x, d_main, d_guide, deriv = inputs_for(generator, shape, layout, dtype, device)
    noise = random_input(generator, shape, layout, dtype, device)
    prev = random_input(generator, shape, layout, dtype, device)
    return dict(x=x, d_main=d_main, d_guide=d_guide, deriv=deriv, noise=noise, prev=prev)


def guide_cases(d_guide):
    """(d_guide, guidance) pairs: no guide prediction, then each guidance value."""
    return [(None, 1.0)] + [(d_guide, w) for w in GUIDANCES]


def run(op, t, d_guide, guidance, backend, *, out=None, second=None, flags=None):
    """op ("euler", "ancestral", "heun", "dpmpp_2m") on the inputs t (see all_inputs) with its step of
    this file; returns its outputs as a tuple (x_next[, deriv or D])."""
    if op in ("euler", "ancestral"):
        ancestral = op == "ancestral"
        return ops.guided_euler(t["x"], t["d_main"], d_guide, guidance, T_CUR, SIGMA_DOWN if ancestral else T_NEXT,
                                out=out, deriv_out=second, noise=t["noise"] if ancestral else None,
                                noise_scale=SIGMA_UP if ancestral else 0.0, flags=flags, backend=backend)
    if op == "heun":
        return (ops.guided_heun(t["x"], t["deriv"], t["d_main"], d_guide, guidance, T_CUR, T_NEXT, out=out,
                                flags=flags, backend=backend),)
    return ops.guided_dpmpp_2m(t["x"], t["d_main"], d_guide, t["prev"], guidance, *DPM_COEFS, out=out,
                               denoised_out=second, flags=flags, backend=backend)


def expected(op, t, d_guide, guidance):
    """float64 (value, size) of each output of run(op, ...)."""
    if op == "euler":
        return euler64(t["x"], t["d_main"], d_guide, guidance, T_CUR, T_NEXT)
    if op == "ancestral":
        return euler64(t["x"], t["d_main"], d_guide, guidance, T_CUR, SIGMA_DOWN, t["noise"], SIGMA_UP)
    if op == "heun":
        return (heun64(t["x"], t["deriv"], t["d_main"], d_guide, guidance, T_CUR, T_NEXT),)
    return dpm64(t["x"], t["d_main"], d_guide, t["prev"], guidance, *DPM_COEFS)


# ---- availability ----

def test_cpp_backend_is_built():
    info = fastguide.backends()
    assert set(info) == {"reference", "cpp", "triton", "cuda"}
    assert info["cpp"]["available"], f"fastguide._C is required here: {info['cpp']['reason']}"
    assert info["reference"]["available"]
    assert info["triton"]["available"], info["triton"]["reason"]
    if not HAS_CUDA:
        assert not info["cuda"]["available"] and info["cuda"]["reason"]


def test_auto_picks_cpp_on_cpu():
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpp"


# ---- each backend against float64 ----

@pytest.mark.parametrize("with_noise", [False, True], ids=["plain", "ancestral"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_euler_matches_float64(backend, device, dtype, layout, with_noise, generator):
    shape, how = LAYOUTS[layout]
    t_cur, t_next = 2.7, 1.9
    x, d_main, d_guide, _ = inputs_for(generator, shape, how, dtype, device, t_cur)
    noise = random_input(generator, shape, how, dtype, device) if with_noise else None
    noise_scale = 1.35 if with_noise else 0.0
    for guide, guidance in guide_cases(d_guide):
        out, deriv_out = poisoned_output(shape, how, dtype, device), poisoned_output(shape, how, dtype, device)
        got = ops.guided_euler(x, d_main, guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out,
                               noise=noise, noise_scale=noise_scale, backend=backend)
        assert got[0] is out and got[1] is deriv_out
        expected_next, expected_deriv = euler64(x, d_main, guide, guidance, t_cur, t_next, noise, noise_scale)
        case = f"{backend} {dtype} {layout} guide={guide is not None} w={guidance} noise={with_noise}"
        assert_matches(f"x_next ({case})", out, expected_next, backend)
        assert_matches(f"deriv ({case})", deriv_out, expected_deriv, backend)
        if how is not None:
            assert_untouched_outside(out, case)
            assert_untouched_outside(deriv_out, case)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_heun_matches_float64(backend, device, dtype, layout, generator):
    shape, how = LAYOUTS[layout]
    t_cur, t_next = 2.7, 1.9
    x, d_main, d_guide, deriv = inputs_for(generator, shape, how, dtype, device, t_cur)
    for guide, guidance in guide_cases(d_guide):
        out = poisoned_output(shape, how, dtype, device)
        got = ops.guided_heun(x, deriv, d_main, guide, guidance, t_cur, t_next, out=out, backend=backend)
        assert got is out
        case = f"{backend} {dtype} {layout} guide={guide is not None} w={guidance}"
        assert_matches(f"x_next ({case})", out, heun64(x, deriv, d_main, guide, guidance, t_cur, t_next), backend)
        if how is not None:
            assert_untouched_outside(out, case)


# (denoised_prev, prev_coef): second order; first order with a NaN-filled D_prev that must not be
# read; first order without one.
DPM_PREV_CASES = ("second_order", "first_order_nan_prev", "first_order_no_prev")


@pytest.mark.parametrize("prev_case", DPM_PREV_CASES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_dpmpp_2m_matches_float64(backend, device, dtype, layout, prev_case, generator):
    shape, how = LAYOUTS[layout]
    x, d_main, d_guide, prev = inputs_for(generator, shape, how, dtype, device)
    x_coef, d_coef, prev_coef = DPM_COEFS
    if prev_case != "second_order":
        x_coef, d_coef, prev_coef = reference.dpmpp_2m_coefficients(None, T_CUR, T_NEXT)
        prev = poisoned_output(shape, how, dtype, device) if prev_case == "first_order_nan_prev" else None
    for guide, guidance in guide_cases(d_guide):
        out, denoised_out = poisoned_output(shape, how, dtype, device), poisoned_output(shape, how, dtype, device)
        got = ops.guided_dpmpp_2m(x, d_main, guide, prev, guidance, x_coef, d_coef, prev_coef, out=out,
                                  denoised_out=denoised_out, backend=backend)
        assert got[0] is out and got[1] is denoised_out
        expected_next, expected_denoised = dpm64(x, d_main, guide, prev, guidance, x_coef, d_coef, prev_coef)
        case = f"{backend} {dtype} {layout} {prev_case} guide={guide is not None} w={guidance}"
        assert_matches(f"x_next ({case})", out, expected_next, backend)
        assert_matches(f"D ({case})", denoised_out, expected_denoised, backend)
        if how is not None:
            assert_untouched_outside(out, case)
            assert_untouched_outside(denoised_out, case)


# ---- the C++/CUDA kernels: their float32 formula, bit for bit ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", NATIVE_BACKENDS)
def test_native_kernels_round_exactly(backend, device, dtype, generator):
    """0 ulp: float32 results equal the kernels' float32 formula (FMAs included, written here with
    torch ops); float16/bfloat16 results equal that float32 value rounded to nearest even by torch.
    Inputs of every scale, so that float16 results span subnormals to large values."""
    shape = (4099,)
    scale = torch.exp2(torch.randint(-20, 12, shape, generator=generator).double()).float()
    t = {name: (v.float() * scale).to(device, dtype)
         for name, v in all_inputs(generator, shape, None, torch.float32, "cpu").items()}
    flat = {name: v.cpu() for name, v in t.items()}
    for guide_name, guidance in ((None, 1.0), ("d_guide", 2.5), ("d_guide", -0.7)):
        guide, guide_cpu = t.get(guide_name), flat.get(guide_name)
        cases = {
            "euler": (run("euler", t, guide, guidance, backend),
                      euler32(flat["x"], flat["d_main"], guide_cpu, guidance, T_CUR, T_NEXT)),
            "ancestral": (run("ancestral", t, guide, guidance, backend),
                          euler32(flat["x"], flat["d_main"], guide_cpu, guidance, T_CUR, SIGMA_DOWN, flat["noise"],
                                  SIGMA_UP)),
            "heun": (run("heun", t, guide, guidance, backend),
                     (heun32(flat["x"], flat["deriv"], flat["d_main"], guide_cpu, guidance, T_CUR, T_NEXT),)),
            "dpmpp_2m": (run("dpmpp_2m", t, guide, guidance, backend),
                         dpm32(flat["x"], flat["d_main"], guide_cpu, flat["prev"], guidance, *DPM_COEFS)),
        }
        for op, (got, want) in cases.items():
            for index, (g, w) in enumerate(zip(got, want)):
                assert_same_bits(f"{op} output {index} ({dtype}, guide={guide_name}, w={guidance})", g, w.to(dtype))


# ---- sizes ----

LARGE = 1_000_003


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_large_odd_size(backend, device, dtype, generator):
    """1000003 elements: the vector body, the per-thread tails and the last partial vector."""
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow at this size: float32 only (other dtypes at small sizes)")
    if backend == "reference" and dtype != torch.float32:
        pytest.skip("plain PyTorch has no size-dependent code path: float32 only (other dtypes at small sizes)")
    t = all_inputs(generator, (LARGE,), None, dtype, device)
    for op in OPS:
        outputs = [poisoned_output((LARGE,), None, dtype, device) for _ in range(2)]
        got = run(op, t, t["d_guide"], -1.5, backend, out=outputs[0], second=outputs[1])
        for index, (g, e) in enumerate(zip(got, expected(op, t, t["d_guide"], -1.5))):
            assert_matches(f"{op} output {index}", g, e, backend)


def streaming_size(dtype):
    """Just above 8 MiB per tensor (the non-temporal store threshold), odd."""
    return (8 << 20) // torch.finfo(dtype).bits * 8 + 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpp_streaming_stores_at_large_sizes(dtype, generator):
    """Outputs of 8 MiB and more take the kernels' non-temporal store path (odd sizes just above it)."""
    numel = streaming_size(dtype)
    t = all_inputs(generator, (numel,), None, dtype, "cpu")
    for op in OPS:
        outputs = [poisoned_output((numel,), None, dtype, "cpu") for _ in range(2)]
        got = run(op, t, t["d_guide"], 2.5, "cpp", out=outputs[0], second=outputs[1])
        for index, (g, e) in enumerate(zip(got, expected(op, t, t["d_guide"], 2.5))):
            assert_matches(f"{op} output {index}", g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cpp_large_in_place_and_misaligned_outputs(op, dtype, generator):
    """At the streaming sizes: out=x in place (aligned, so streamed) and outputs 4 bytes past a
    32-byte boundary (buf[1:] of a NaN-filled buffer: the plain-store fallback) give the bits of
    fresh aligned outputs, which match float64; nothing is written before the views."""
    numel = streaming_size(dtype)
    t = all_inputs(generator, (numel,), None, dtype, "cpu")
    reference_outputs = run(op, t, t["d_guide"], 2.5, "cpp")
    for index, (g, e) in enumerate(zip(reference_outputs, expected(op, t, t["d_guide"], 2.5))):
        assert_matches(f"{op} output {index}", g, e)

    buffers = [torch.full((numel + 1,), float("nan"), dtype=dtype) for _ in range(2)]
    misaligned = [b[1:] for b in buffers]
    assert all(v.data_ptr() % 32 != 0 for v in misaligned)
    got = run(op, t, t["d_guide"], 2.5, "cpp", out=misaligned[0], second=misaligned[1])
    for index, (g, want) in enumerate(zip(got, reference_outputs)):
        assert_same_bits(f"{op} misaligned output {index}", g, want)
    assert all(bool(torch.isnan(b[0])) for b in buffers), "wrote before a misaligned view"

    in_place = dict(t, x=t["x"].clone())
    assert in_place["x"].data_ptr() % 32 == 0
    second = t["prev"].clone() if op == "dpmpp_2m" else None  # D written over D_prev: the history buffer
    in_place["prev"] = second if op == "dpmpp_2m" else t["prev"]
    got = run(op, in_place, t["d_guide"], 2.5, "cpp", out=in_place["x"], second=second)
    assert got[0] is in_place["x"]
    for index, (g, want) in enumerate(zip(got, reference_outputs)):
        assert_same_bits(f"{op} in-place output {index}", g, want)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_euler_to_zero_and_fresh_outputs(backend, device, generator):
    """The last step goes to t_next = 0; without out= the ops allocate contiguous results."""
    x, d_main, d_guide, deriv = inputs_for(generator, (3, 11), "transpose", torch.float32, device)
    x_next, deriv_out = ops.guided_euler(x, d_main, d_guide, 1.8, 0.002, 0.0, backend=backend)
    assert x_next.is_contiguous() and deriv_out.is_contiguous() and x_next.shape == x.shape
    expected_next, expected_deriv = euler64(x, d_main, d_guide, 1.8, 0.002, 0.0)
    assert_matches("x_next", x_next, expected_next, backend)
    assert_matches("deriv", deriv_out, expected_deriv, backend)
    heun = ops.guided_heun(x, deriv, d_main, None, 1.0, 5.0, 80.0, backend=backend)  # t_next > t_cur works
    assert_matches("heun", heun, heun64(x, deriv, d_main, None, 1.0, 5.0, 80.0), backend)
    coefs = reference.dpmpp_2m_coefficients(0.01, 0.002, 0.0)  # to σ = 0: x_next = D
    x_next, denoised = ops.guided_dpmpp_2m(x, d_main, d_guide, deriv, 1.8, *coefs, backend=backend)
    assert x_next.is_contiguous() and denoised.is_contiguous()
    expected_next, expected_denoised = dpm64(x, d_main, d_guide, deriv, 1.8, *coefs)
    assert_matches("dpm x_next", x_next, expected_next, backend)
    assert_matches("dpm D", denoised, expected_denoised, backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_tensors(backend, device, op):
    """Zero elements: fresh results of shape (0, 3); outputs given as empty views into NaN-filled
    buffers, and flags, are left exactly as they were."""
    t = {name: torch.empty(0, 3, device=device) for name in ("x", "d_main", "d_guide", "deriv", "noise", "prev")}
    fresh = run(op, t, t["d_guide"], 2.0, backend)
    assert all(r.shape == (0, 3) and r.dtype == torch.float32 and r.device.type == device for r in fresh)
    buffers = [torch.full((8,), float("nan"), device=device) for _ in range(2)]
    outputs = [b[4:4].view(0, 3) for b in buffers]
    flags = torch.tensor([5], dtype=torch.int32, device=device)
    got = run(op, t, t["d_guide"], 2.0, backend, out=outputs[0], second=outputs[1], flags=flags)
    assert got[0] is outputs[0]
    assert all(bool(torch.isnan(b).all()) for b in buffers), "an empty op wrote into its outputs' storage"
    assert flags.item() == 5


@pytest.mark.parametrize("op", OPS)
def test_cpp_results_do_not_depend_on_thread_count(op, generator):
    """Same inputs, same bits (and flags) with 1 and 2 threads, across several thread tasks."""
    t = all_inputs(generator, (300_007,), None, torch.float32, "cpu")
    t["d_main"][123_456] = float("inf")
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            flags = torch.zeros(1, dtype=torch.int32)
            results.append((run(op, t, t["d_guide"], 2.5, "cpp", flags=flags), flags.item()))
    (one, one_flags), (two, two_flags) = results
    assert one_flags == two_flags == 5
    for index, (a, b) in enumerate(zip(one, two)):
        assert_same_bits(f"{op} output {index}", a, b)


# ---- outputs that alias inputs ----

@pytest.mark.parametrize("backend, device", BACKENDS)
def test_outputs_may_alias_inputs(backend, device, generator):
    """In-place use: out is x, deriv_out is d_guide, Heun's out is deriv or d_main, or out partly overlaps x."""
    shape, w, t_cur, t_next = (5, 9), 2.5, 3.1, 1.2
    x, d_main, d_guide, deriv = inputs_for(generator, shape, None, torch.float32, device)
    expected_next, expected_deriv = euler64(x, d_main, d_guide, w, t_cur, t_next)
    x_inplace, guide_inplace = x.clone(), d_guide.clone()
    ops.guided_euler(x_inplace, d_main, guide_inplace, w, t_cur, t_next, out=x_inplace, deriv_out=guide_inplace,
                     backend=backend)
    assert_matches("out=x", x_inplace, expected_next)
    assert_matches("deriv_out=d_guide", guide_inplace, expected_deriv)

    noise = torch.randn(shape, generator=generator).to(device)
    expected_ancestral = euler64(x, d_main, d_guide, w, t_cur, t_next, noise, 0.8)[0]
    noise_inplace = noise.clone()
    ops.guided_euler(x, d_main, d_guide, w, t_cur, t_next, out=noise_inplace, deriv_out=torch.empty_like(x),
                     noise=noise_inplace, noise_scale=0.8, backend=backend)
    assert_matches("out=noise", noise_inplace, expected_ancestral)

    expected_heun = heun64(x, deriv, d_main, d_guide, w, t_cur, t_next)
    for target in ("deriv", "d_main"):
        args = dict(x=x.clone(), deriv=deriv.clone(), d_main=d_main.clone())
        ops.guided_heun(args["x"], args["deriv"], args["d_main"], d_guide, w, t_cur, t_next, out=args[target],
                        backend=backend)
        assert_matches(f"heun out={target}", args[target], expected_heun)

    # out starts one element after x in the same storage: a partial overlap.
    storage = torch.empty(x.numel() + 1, device=device)
    x_shifted, out_shifted = storage[:-1].view(shape), storage[1:].view(shape)
    x_shifted.copy_(x)
    deriv_out = torch.full_like(x, float("nan"))
    ops.guided_euler(x_shifted, d_main, d_guide, w, t_cur, t_next, out=out_shifted, deriv_out=deriv_out,
                     backend=backend)
    assert_matches("partial overlap", out_shifted, expected_next)
    assert_matches("partial overlap deriv", deriv_out, expected_deriv)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_dpmpp_2m_history_buffer_and_in_place(backend, device, generator):
    """The sampler's use: out is x and denoised_out is denoised_prev (read, then written, per
    element); also out = d_main with denoised_out = d_guide, and a D_prev shifted by one element
    inside denoised_out's storage (a partial overlap: through a temporary)."""
    shape, w = (4, 25), 2.5
    x, d_main, d_guide, prev = inputs_for(generator, shape, None, torch.float32, device)
    want_next, want_denoised = dpm64(x, d_main, d_guide, prev, w, *DPM_COEFS)
    x_inplace, history = x.clone(), prev.clone()
    got = ops.guided_dpmpp_2m(x_inplace, d_main, d_guide, history, w, *DPM_COEFS, out=x_inplace,
                              denoised_out=history, backend=backend)
    assert got[0] is x_inplace and got[1] is history
    assert_matches("out=x", x_inplace, want_next)
    assert_matches("denoised_out=denoised_prev", history, want_denoised)

    main_inplace, guide_inplace = d_main.clone(), d_guide.clone()
    ops.guided_dpmpp_2m(x, main_inplace, guide_inplace, prev, w, *DPM_COEFS, out=main_inplace,
                        denoised_out=guide_inplace, backend=backend)
    assert_matches("out=d_main", main_inplace, want_next)
    assert_matches("denoised_out=d_guide", guide_inplace, want_denoised)

    storage = torch.empty(x.numel() + 1, device=device)
    prev_shifted, denoised_shifted = storage[1:].view(shape), storage[:-1].view(shape)
    prev_shifted.copy_(prev)
    out = torch.full_like(x, float("nan"))
    ops.guided_dpmpp_2m(x, d_main, d_guide, prev_shifted, w, *DPM_COEFS, out=out, denoised_out=denoised_shifted,
                        backend=backend)
    assert_matches("partial overlap x_next", out, want_next)
    assert_matches("partial overlap D", denoised_shifted, want_denoised)


# ---- non-finite flags ----

def poison(t, name, index, value):
    """The inputs t with t[name].flatten()[index] = value (a fresh copy of that tensor)."""
    changed = t[name].clone()
    changed.view(-1)[index] = value
    return dict(t, **{name: changed})


# name: (input to change or None, value, guided?, expected bits per op {op: bits} or an int for all ops)
FLAG_CASES = {
    "finite": (None, None, True, 0),
    "nan_d_main": ("d_main", math.nan, True, 1 | 4),
    "inf_d_main_no_guide": ("d_main", math.inf, False, 1 | 4),
    "inf_d_guide": ("d_guide", math.inf, True, 2 | 4),
    "nan_d_guide_w0": ("d_guide", math.nan, True, 2 | 4),
    "nan_x": ("x", math.nan, True, 4),
    "inf_noise": ("noise", math.inf, True, dict(euler=0, ancestral=4, heun=0, dpmpp_2m=0)),
    "nan_deriv": ("deriv", math.nan, True, dict(euler=0, ancestral=0, heun=4, dpmpp_2m=0)),
    "nan_prev": ("prev", math.nan, True, dict(euler=0, ancestral=0, heun=0, dpmpp_2m=4)),
}


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("case", list(FLAG_CASES))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_flags_bits(backend, device, op, case, where, generator):
    """Each bit set exactly when it should be, ORed into the old value of a one-element view of a
    bigger int32 buffer (its neighbours untouched), wherever the bad element is."""
    numel = 70_001  # more than one Triton program and C++ vector chunk; a partial last chunk
    name, value, guided, bits = FLAG_CASES[case]
    bits = bits[op] if isinstance(bits, dict) else bits
    t = all_inputs(generator, (numel,), None, torch.float32, device)
    if name is not None:
        t = poison(t, name, {"first": 0, "middle": numel // 2 + 3, "last": numel - 1}[where], value)
    guidance = 0.0 if case.endswith("_w0") else 2.5
    buffer = torch.tensor([16, 8, 32], dtype=torch.int32, device=device)
    run(op, t, t["d_guide"] if guided else None, guidance, backend, flags=buffer[1:2])
    assert buffer.tolist() == [16, 8 | bits, 32], f"{op} {case} at {where}: bits {buffer[1].item() & 7}, want {bits}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_flags_float16_overflow_and_unread_prev(backend, device, op, generator):
    """Bit 4 alone when finite float16 inputs give an x_next that overflows to inf in storage; no
    bit from a NaN D_prev that a first-order step does not read."""
    t = all_inputs(generator, (1001,), None, torch.float16, device)
    for name in ("x", "deriv"):  # one element whose x_next is ≈ 180000 > 65504 in every op
        t = poison(t, name, 500, 60000.0)
    t = poison(t, "d_main", 500, 0.0)
    t = poison(t, "d_guide", 500, 0.0)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    if op == "dpmpp_2m":
        ops.guided_dpmpp_2m(t["x"], t["d_main"], t["d_guide"], t["prev"], 2.5, 3.0, 0.5, -0.25, flags=flags,
                            backend=backend)
    elif op == "heun":
        ops.guided_heun(t["x"], t["deriv"], t["d_main"], t["d_guide"], 2.5, 1.0, 3.0, flags=flags, backend=backend)
    else:
        ops.guided_euler(t["x"], t["d_main"], t["d_guide"], 2.5, 1.0, 3.0, noise=t["noise"] if op == "ancestral"
                         else None, noise_scale=0.5, flags=flags, backend=backend)
    assert flags.item() == 4

    if op == "dpmpp_2m":
        unread = torch.full_like(t["x"], float("nan"))
        flags.zero_()
        x_next, _ = ops.guided_dpmpp_2m(t["x"], t["d_main"], t["d_guide"], unread, 2.5, 0.5, 0.5, 0.0, flags=flags,
                                        backend=backend)
        assert flags.item() == 0 and bool(torch.isfinite(x_next).all())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_flags_at_the_rounding_limit(backend, device, dtype):
    """x_next = x + D in float32, just above and just below the value that rounds (to nearest even)
    to inf in float16/bfloat16: bit 4 follows what is stored (the Triton interpreter truncates
    bfloat16, so there its stored value stays finite)."""
    largest = torch.finfo(dtype).max
    gap = {torch.float16: 16.0, torch.bfloat16: 2.0 ** 119}[dtype]  # to the midpoint above the largest
    x = torch.full((3,), largest, dtype=dtype, device=device)
    for step, rounds_to_inf in ((gap * 1.25, True), (gap * 0.75, False)):
        d_main = torch.full((3,), step, dtype=dtype, device=device)
        flags = torch.zeros(1, dtype=torch.int32, device=device)
        x_next, _ = ops.guided_dpmpp_2m(x, d_main, None, None, 1.0, 1.0, 1.0, 0.0, flags=flags, backend=backend)
        stored_finite = bool(torch.isfinite(x_next).all())
        assert flags.item() == (0 if stored_finite else 4), (step, x_next)
        if not (backend == "triton" and dtype == torch.bfloat16):
            assert stored_finite != rounds_to_inf, (step, x_next)


# ---- property tests ----

@st.composite
def op_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    t_cur = draw(st.floats(0.002, 80.0))
    return dict(
        backend=draw(st.sampled_from([p.values for p in BACKENDS if not p.marks or HAS_CUDA])),
        dtype=draw(st.sampled_from(DTYPES)),
        shape=shape,
        transposed=len(shape) >= 2 and draw(st.booleans()),
        with_guide=draw(st.booleans()),
        guidance=draw(st.floats(-4.0, 8.0)),
        t_cur=t_cur,
        t_next=draw(st.floats(0.001, 1.0)) * t_cur,
        sigma_prev=draw(st.none() | st.floats(1.001, 3.0)),
        noise_scale=draw(st.floats(0.0, 2.0)),
        seed=draw(st.integers(0, 2 ** 31)),
    )


@settings(max_examples=40, deadline=None)
@given(case=op_cases())
def test_property_all_ops_match_float64(case):
    (backend, device), dtype, shape = case["backend"], case["dtype"], case["shape"]
    generator = torch.Generator().manual_seed(case["seed"])
    layout = "transpose" if case["transposed"] else None
    x, d_main, d_guide, deriv = inputs_for(generator, shape, layout, dtype, device, case["t_cur"])
    noise = random_input(generator, shape, layout, dtype, device)
    d_guide = d_guide if case["with_guide"] else None
    w, t_cur, t_next, noise_scale = case["guidance"], case["t_cur"], case["t_next"], case["noise_scale"]
    # (the second-order coefficients divide by log(t_cur) − log(t_next): first order where that is 0)
    zero_step = math.log(t_cur) == math.log(t_next)
    sigma_prev = None if case["sigma_prev"] is None or zero_step else case["sigma_prev"] * t_cur
    coefs = reference.dpmpp_2m_coefficients(sigma_prev, t_cur, t_next)
    expected_next, expected_deriv = euler64(x, d_main, d_guide, w, t_cur, t_next)
    expected_ancestral = euler64(x, d_main, d_guide, w, t_cur, t_next, noise, noise_scale)[0]
    expected_heun = heun64(x, deriv, d_main, d_guide, w, t_cur, t_next)
    expected_dpm = dpm64(x, d_main, d_guide, deriv, w, *coefs)
    largest = max(float(e[0].abs().max()) for e in (expected_next, expected_deriv, expected_heun, expected_ancestral,
                                                     *expected_dpm))
    assume(largest < torch.finfo(dtype).max / 2)  # float16 results can overflow; that is not a kernel error
    out, deriv_out = poisoned_output(shape, None, dtype, device), poisoned_output(shape, None, dtype, device)
    ops.guided_euler(x, d_main, d_guide, w, t_cur, t_next, out=out, deriv_out=deriv_out, backend=backend)
    assert_matches("x_next", out, expected_next, backend)
    assert_matches("deriv", deriv_out, expected_deriv, backend)
    ancestral = ops.guided_euler(x, d_main, d_guide, w, t_cur, t_next, noise=noise, noise_scale=noise_scale,
                                 backend=backend)[0]
    assert_matches("ancestral", ancestral, expected_ancestral, backend)
    heun_out = poisoned_output(shape, None, dtype, device)
    ops.guided_heun(x, deriv, d_main, d_guide, w, t_cur, t_next, out=heun_out, backend=backend)
    assert_matches("heun", heun_out, expected_heun, backend)
    dpm = ops.guided_dpmpp_2m(x, d_main, d_guide, deriv, w, *coefs, backend=backend)
    assert_matches("dpm x_next", dpm[0], expected_dpm[0], backend)
    assert_matches("dpm D", dpm[1], expected_dpm[1], backend)


# ---- bad input ----

def good_args():
    x = torch.randn(2, 3)
    return dict(x=x, d_main=torch.randn(2, 3), d_guide=torch.randn(2, 3), guidance=2.0, t_cur=1.0, t_next=0.5)


BAD_FLAGS = [
    (dict(flags=torch.zeros(1)), TypeError, "flags must be int32, got torch.float32"),
    (dict(flags=torch.zeros(2, dtype=torch.int32)), ValueError, "flags must have one element, got 2"),
    (dict(flags=torch.zeros(1, dtype=torch.int32, device="meta")), ValueError, "flags is on meta"),
    (dict(flags=[0]), TypeError, "flags must be a tensor"),
]

BAD_EULER = [
    (dict(d_main=torch.randn(3, 2)), ValueError, r"d_main has shape \(3, 2\), expected x's shape \(2, 3\)"),
    (dict(d_guide=torch.randn(2, 3, dtype=torch.float64)), TypeError, "d_guide has dtype torch.float64"),
    (dict(d_guide=torch.randn(2, 3, device="meta")), ValueError, "d_guide is on meta"),
    (dict(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x must have a dtype in"),
    (dict(d_main=torch.ones(2, 3, dtype=torch.int32)), TypeError, "d_main has dtype torch.int32"),
    (dict(d_main=[1.0]), TypeError, "d_main must be a tensor"),
    (dict(d_main=None), TypeError, "d_main must be a tensor, got NoneType"),
    (dict(guidance=float("nan")), ValueError, "guidance must be finite"),
    (dict(guidance=True), TypeError, "guidance must be a real number"),
    (dict(t_cur=float("inf")), ValueError, "t_cur must be finite"),
    (dict(t_next=float("-inf")), ValueError, "t_next must be finite"),
    (dict(t_cur=0.0), ValueError, r"t_cur must be > 0, got 0.0"),
    (dict(t_cur=-1.0), ValueError, r"t_cur must be > 0"),
    (dict(noise=torch.randn(3, 2)), ValueError, "noise has shape"),
    (dict(noise=torch.randn(2, 3, dtype=torch.float16)), TypeError, "noise has dtype torch.float16"),
    (dict(noise_scale=float("nan")), ValueError, "noise_scale must be finite"),
    (dict(out=torch.empty(2, 3, dtype=torch.float16)), TypeError, "out has dtype torch.float16"),
    *BAD_FLAGS,
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton", "auto"])
@pytest.mark.parametrize("change, error, message", BAD_EULER)
def test_euler_rejects_bad_input(backend, change, error, message):
    args = dict(good_args(), **change)
    keywords = {name: args.pop(name) for name in ("noise", "noise_scale", "flags", "out") if name in args}
    with pytest.raises(error, match=message):
        ops.guided_euler(args.pop("x"), *args.values(), backend=backend, **keywords)


@pytest.mark.parametrize("change, error, message", [
    (dict(t_next=0.0), ValueError, r"t_next must be > 0"),
    (dict(deriv=torch.randn(2, 4)), ValueError, "deriv has shape"),
    (dict(deriv=None), TypeError, "deriv must be a tensor"),
    (dict(d_main=None), TypeError, "d_main must be a tensor"),
    (dict(out=torch.empty(2, 3, dtype=torch.float16)), TypeError, "out has dtype torch.float16"),
    (dict(out=torch.empty(6)), ValueError, "out has shape"),
    *BAD_FLAGS,
])
def test_heun_rejects_bad_input(change, error, message):
    args = dict(good_args(), **{"deriv": torch.randn(2, 3), "out": None, "flags": None, **change})
    with pytest.raises(error, match=message):
        ops.guided_heun(args["x"], args["deriv"], args["d_main"], args["d_guide"], args["guidance"], args["t_cur"],
                        args["t_next"], out=args["out"], flags=args["flags"], backend="cpp")


def good_dpm_args():
    return dict(x=torch.randn(2, 3), d_main=torch.randn(2, 3), d_guide=torch.randn(2, 3),
                denoised_prev=torch.randn(2, 3), guidance=2.0, x_coef=0.7, d_coef=0.4, prev_coef=-0.1)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("change, error, message", [
    (dict(d_main=None), TypeError, "d_main must be a tensor, got NoneType"),
    (dict(denoised_prev=None), ValueError, r"denoised_prev must be a tensor when prev_coef != 0"),
    (dict(denoised_prev=torch.randn(2, 3, dtype=torch.float64)), TypeError, "denoised_prev has dtype"),
    (dict(denoised_prev=torch.randn(3)), ValueError, "denoised_prev has shape"),
    (dict(x_coef=float("nan")), ValueError, "x_coef must be finite"),
    (dict(d_coef=float("inf")), ValueError, "d_coef must be finite"),
    (dict(prev_coef="0.5"), TypeError, "prev_coef must be a real number"),
    (dict(denoised_out=torch.empty(6)), ValueError, "denoised_out has shape"),
    *BAD_FLAGS,
])
def test_dpmpp_2m_rejects_bad_input(backend, change, error, message):
    args = dict(good_dpm_args(), **change)
    keywords = {name: args.pop(name) for name in ("denoised_out", "flags") if name in args}
    with pytest.raises(error, match=message):
        ops.guided_dpmpp_2m(*args.values(), backend=backend, **keywords)


def test_bad_backend_names_and_devices():
    args = good_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.guided_euler(*args.values(), backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.guided_dpmpp_2m(*good_dpm_args().values(), backend="gpu")
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors"):
        dispatch.resolve("cpp", torch.device("meta"))
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ops.guided_euler(*args.values(), backend="cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    """As on a GPU machine: Triton is available, but CPU tensors need the interpreter."""
    real = dispatch._availability
    monkeypatch.setattr(dispatch, "_availability",
                        lambda name, family="guided": (True, "test") if name == "triton" else real(name, family))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        dispatch.resolve("triton", torch.device("cpu"))


def test_kernels_check_their_arguments_when_called_directly():
    """torch.ops.fastguide.* (bypassing fastguide.ops) refuse bad input with the argument's name."""
    import fastguide._extension_ops  # noqa: F401  (loads fastguide._C)
    x, d_main = torch.randn(4), torch.randn(4)
    op = torch.ops.fastguide
    with pytest.raises(RuntimeError, match="d_main has shape"):
        op.guided_euler(x, torch.randn(5), None, 1.0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="d_guide has dtype"):
        op.guided_euler(x, d_main, torch.randn(4, dtype=torch.float64), 1.0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        op.guided_euler(torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), None, 1.0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="t_cur must be > 0"):
        op.guided_euler(x, d_main, None, 1.0, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="noise has shape"):
        op.guided_euler(x, d_main, None, 1.0, 1.0, 0.5, noise=torch.randn(3), noise_scale=1.0)
    with pytest.raises(RuntimeError, match="noise_scale must be finite"):
        op.guided_euler(x, d_main, None, 1.0, 1.0, 0.5, noise=x, noise_scale=float("inf"))
    with pytest.raises(RuntimeError, match="guidance must be finite"):
        op.guided_heun(x, x, d_main, None, float("nan"), 1.0, 0.5)
    with pytest.raises(RuntimeError, match="t_next must be > 0"):
        op.guided_heun(x, x, d_main, None, 1.0, 1.0, 0.0)
    shared = torch.empty(4)
    with pytest.raises(RuntimeError, match="out and deriv_out must not share memory"):
        op.guided_euler_out(x, d_main, None, 1.0, 1.0, 0.5, out=shared, deriv_out=shared)
    with pytest.raises(RuntimeError, match="internal overlap|more than one element"):
        op.guided_heun_out(x, x, d_main, None, 1.0, 1.0, 0.5, out=torch.empty(1).expand(4))
    with pytest.raises(RuntimeError, match="flags must be int32"):
        op.guided_heun_out(x, x, d_main, None, 1.0, 1.0, 0.5, out=torch.empty(4), flags=torch.zeros(1))
    with pytest.raises(RuntimeError, match="flags must have one element"):
        op.guided_euler_out(x, d_main, None, 1.0, 1.0, 0.5, out=torch.empty(4), deriv_out=torch.empty(4),
                            flags=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="denoised_prev must be a tensor when prev_coef != 0"):
        op.guided_dpmpp_2m(x, d_main, None, None, 1.0, 0.5, 0.5, 0.1)
    with pytest.raises(RuntimeError, match="prev_coef must be finite"):
        op.guided_dpmpp_2m(x, d_main, None, x, 1.0, 0.5, 0.5, float("nan"))
    with pytest.raises(RuntimeError, match="denoised_prev has shape"):
        op.guided_dpmpp_2m(x, d_main, None, torch.randn(5), 1.0, 0.5, 0.5, 0.0)
    with pytest.raises(RuntimeError, match="out and denoised_out must not share memory"):
        op.guided_dpmpp_2m_out(x, d_main, None, None, 1.0, 0.5, 0.5, 0.0, out=shared, denoised_out=shared)


# ---- dispatch ----

def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    real = dispatch._availability
    monkeypatch.setattr(dispatch, "_availability",
                        lambda name, family="guided": (False, "simulated: not built") if name == "cpp"
                        else real(name, family))
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="simulated: not built"):
        assert dispatch.resolve("auto", torch.device("cpu")) == "reference"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: simulated"):
        dispatch.resolve("cpp", torch.device("cpu"))


def test_implementation_modules_share_one_signature():
    """Every backend module has reference.py's functions with its parameter names and kinds."""
    for function in ("guided_euler", "guided_heun", "guided_dpmpp_2m"):
        contract = inspect.signature(getattr(reference, function)).parameters
        for name in ("cpp", "triton"):
            parameters = inspect.signature(getattr(dispatch.implementation(name), function)).parameters
            assert [(p.name, p.kind) for p in parameters.values()] == \
                [(p.name, p.kind) for p in contract.values()], (name, function)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.implementation("fast")


# ---- torch.compile ----

def test_ops_trace_under_torch_compile(generator):
    """fullgraph compile of a fused step with the cpp backend: the graph calls the fastguide ops."""
    x, d_main, d_guide, _ = inputs_for(generator, (4, 33), None, torch.float32, "cpu")
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def step(x, d_main, d_guide):
        x_next, deriv = ops.guided_euler(x, d_main, d_guide, 2.5, 3.0, 1.5, backend="cpp")
        return ops.guided_heun(x, deriv, d_main, d_guide, 2.5, 3.0, 1.5, backend="cpp") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=record, fullgraph=True)
    got = compiled(x, d_main, d_guide)
    torch.testing.assert_close(got, step(x, d_main, d_guide), rtol=0, atol=0)
    code = graphs[0].code
    assert "fastguide.guided_euler_out" in code and "fastguide.guided_heun_out" in code, code

    aot = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(aot(x, d_main, d_guide), step(x, d_main, d_guide), rtol=0, atol=0)


def test_opcheck_fake_and_schema(generator):
    """torch.library.opcheck: schemas, fake (meta) implementations, and functionalization."""
    import fastguide._extension_ops  # noqa: F401  (loads fastguide._C and the fake implementations)
    x, d_main, d_guide, deriv = inputs_for(generator, (3, 5), None, torch.float32, "cpu")
    noise = torch.randn(3, 5, generator=generator)
    flags = torch.zeros(1, dtype=torch.int32)
    op = torch.ops.fastguide
    torch.library.opcheck(op.guided_euler.default, (x, d_main, d_guide, 2.0, 1.5, 0.5))
    torch.library.opcheck(op.guided_euler.default, (x, d_main, d_guide, 2.0, 1.5, 0.5),
                          dict(noise=noise, noise_scale=0.3))
    torch.library.opcheck(op.guided_heun.default, (x, deriv, d_main, None, 2.0, 1.5, 0.5))
    torch.library.opcheck(op.guided_dpmpp_2m.default, (x, d_main, d_guide, deriv, 2.0, 0.7, 0.4, -0.1))
    torch.library.opcheck(op.guided_dpmpp_2m.default, (x, d_main, None, None, 2.0, 0.7, 0.4, 0.0))
    torch.library.opcheck(op.guided_euler_out.default, (x, d_main, d_guide, 2.0, 1.5, 0.5),
                          dict(out=torch.empty_like(x), deriv_out=torch.empty_like(x), noise=noise, noise_scale=0.3,
                               flags=flags))
    torch.library.opcheck(op.guided_heun_out.default, (x, deriv, d_main, d_guide, 2.0, 1.5, 0.5),
                          dict(out=torch.empty_like(x), flags=flags))
    torch.library.opcheck(op.guided_dpmpp_2m_out.default, (x, d_main, d_guide, deriv, 2.0, 0.7, 0.4, -0.1),
                          dict(out=torch.empty_like(x), denoised_out=torch.empty_like(x), flags=flags))
