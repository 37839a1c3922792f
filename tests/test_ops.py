"""The fused ops guided_euler / guided_heun: every backend against float64 formulas written here.

Outputs are poisoned with NaN first (and non-contiguous outputs live inside a NaN-filled base
that must stay untouched outside the view).  Error bound per element: tol(dtype) × the float64
value of the same formula on absolute values (the size of the terms the kernel adds), plus one
ulp of the result for float16/bfloat16 storage.  float32: 1e-6 relative to that size.
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastguide
from fastguide import dispatch, ops

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GUIDANCES = (0.0, 1.0, 2.5, -0.7)
MATH_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-6, torch.bfloat16: 1e-6}
# One ulp of the stored result relative to its size (the Triton interpreter truncates bf16).
STORAGE_ULP = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def backend_cases():
    """(backend, device): the CPU backends always; triton on CUDA when there is a GPU."""
    cuda_skip = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")
    return [pytest.param("reference", "cpu", id="reference"),
            pytest.param("cpp", "cpu", id="cpp"),
            pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
            pytest.param("cuda", "cuda", id="cuda", marks=cuda_skip)]


BACKENDS = backend_cases()


# ---- float64 statement of the math ----

def denoised64(d_main, d_guide, guidance):
    if d_guide is None:
        return d_main.double(), d_main.double().abs()
    main, guide = d_main.double(), d_guide.double()
    return guide + guidance * (main - guide), guide.abs() + abs(guidance) * (main.abs() + guide.abs())


def euler64(x, d_main, d_guide, guidance, t_cur, t_next):
    """(x_next, deriv) in float64 and the size of their terms."""
    denoised, denoised_size = denoised64(d_main, d_guide, guidance)
    x64 = x.double()
    deriv = (x64 - denoised) / t_cur
    deriv_size = (x64.abs() + denoised_size) / t_cur
    step = t_next - t_cur
    return (x64 + step * deriv, x64.abs() + abs(step) * deriv_size), (deriv, deriv_size)


def heun64(x, deriv, d_main, d_guide, guidance, t_cur, t_next):
    denoised, denoised_size = denoised64(d_main, d_guide, guidance)
    x64, deriv64 = x.double(), deriv.double()
    step = t_next - t_cur
    x_euler = x64 + step * deriv64
    deriv_next = (x_euler - denoised) / t_next
    deriv_next_size = (x64.abs() + abs(step) * deriv64.abs() + denoised_size) / t_next
    size = x64.abs() + abs(step) / 2 * (deriv64.abs() + deriv_next_size)
    return x64 + step / 2 * (deriv64 + deriv_next), size


def assert_matches(name, got, expected):
    want, size = expected
    assert got.dtype in DTYPES
    got64 = got.detach().to("cpu", torch.float64)
    want, size = want.cpu(), size.cpu()
    assert not torch.isnan(got64).any(), f"{name}: NaN left in the output (an element was not written)"
    bound = MATH_TOL[got.dtype] * size + STORAGE_ULP[got.dtype] * want.abs()
    if got.dtype in (torch.float16, torch.bfloat16):
        bound = bound + torch.finfo(got.dtype).smallest_normal * 2.0 ** -10  # subnormal results
    err = (got64 - want).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"at {worst} (got {got64.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r})")


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


def inputs_for(generator, shape, layout, dtype, device, t_cur=2.7):
    x = random_input(generator, shape, layout, dtype, device, scale=t_cur)
    d_main = random_input(generator, shape, layout, dtype, device)
    d_guide = random_input(generator, shape, layout, dtype, device)
    deriv = random_input(generator, shape, layout, dtype, device)
    return x, d_main, d_guide, deriv


def guide_cases(d_guide):
    """(d_guide, guidance) pairs: no guide prediction, then each guidance value."""
    return [(None, 1.0)] + [(d_guide, w) for w in GUIDANCES]


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

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_euler_matches_float64(backend, device, dtype, layout, generator):
    shape, how = LAYOUTS[layout]
    t_cur, t_next = 2.7, 1.9
    x, d_main, d_guide, _ = inputs_for(generator, shape, how, dtype, device, t_cur)
    for guide, guidance in guide_cases(d_guide):
        out, deriv_out = poisoned_output(shape, how, dtype, device), poisoned_output(shape, how, dtype, device)
        got = ops.guided_euler(x, d_main, guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out,
                               backend=backend)
        assert got[0] is out and got[1] is deriv_out
        expected_next, expected_deriv = euler64(x, d_main, guide, guidance, t_cur, t_next)
        case = f"{backend} {dtype} {layout} guide={guide is not None} w={guidance}"
        assert_matches(f"x_next ({case})", out, expected_next)
        assert_matches(f"deriv ({case})", deriv_out, expected_deriv)
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
        assert_matches(f"x_next ({case})", out, heun64(x, deriv, d_main, guide, guidance, t_cur, t_next))
        if how is not None:
            assert_untouched_outside(out, case)


LARGE = 1_000_003


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_large_odd_size(backend, device, dtype, generator):
    """1000003 elements: the vector body, the per-thread tails and the last partial vector."""
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow at this size: float32 only (other dtypes at small sizes)")
    if backend == "reference" and dtype != torch.float32:
        pytest.skip("plain PyTorch has no size-dependent code path: float32 only (other dtypes at small sizes)")
    x, d_main, d_guide, deriv = inputs_for(generator, (LARGE,), None, dtype, device)
    out, deriv_out = poisoned_output((LARGE,), None, dtype, device), poisoned_output((LARGE,), None, dtype, device)
    ops.guided_euler(x, d_main, d_guide, -1.5, 2.7, 0.4, out=out, deriv_out=deriv_out, backend=backend)
    expected_next, expected_deriv = euler64(x, d_main, d_guide, -1.5, 2.7, 0.4)
    assert_matches("x_next", out, expected_next)
    assert_matches("deriv", deriv_out, expected_deriv)
    heun_out = poisoned_output((LARGE,), None, dtype, device)
    ops.guided_heun(x, deriv, d_main, d_guide, 3.0, 2.7, 0.4, out=heun_out, backend=backend)
    assert_matches("heun x_next", heun_out, heun64(x, deriv, d_main, d_guide, 3.0, 2.7, 0.4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpp_streaming_stores_at_large_sizes(dtype, generator):
    """Outputs of 8 MiB and more take the kernels' non-temporal store path (odd sizes just above it)."""
    numel = (8 << 20) // torch.finfo(dtype).bits * 8 + 7
    x, d_main, d_guide, deriv = inputs_for(generator, (numel,), None, dtype, "cpu")
    out, deriv_out = poisoned_output((numel,), None, dtype, "cpu"), poisoned_output((numel,), None, dtype, "cpu")
    ops.guided_euler(x, d_main, d_guide, 2.5, 2.7, 0.4, out=out, deriv_out=deriv_out, backend="cpp")
    expected_next, expected_deriv = euler64(x, d_main, d_guide, 2.5, 2.7, 0.4)
    assert_matches("x_next", out, expected_next)
    assert_matches("deriv", deriv_out, expected_deriv)
    ops.guided_heun(x, deriv, d_main, None, 2.5, 2.7, 0.4, out=out, backend="cpp")
    assert_matches("heun x_next", out, heun64(x, deriv, d_main, None, 2.5, 2.7, 0.4))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_euler_to_zero_and_fresh_outputs(backend, device, generator):
    """The last step goes to t_next = 0; without out= the ops allocate contiguous results."""
    x, d_main, d_guide, deriv = inputs_for(generator, (3, 11), "transpose", torch.float32, device)
    x_next, deriv_out = ops.guided_euler(x, d_main, d_guide, 1.8, 0.002, 0.0, backend=backend)
    assert x_next.is_contiguous() and deriv_out.is_contiguous() and x_next.shape == x.shape
    expected_next, expected_deriv = euler64(x, d_main, d_guide, 1.8, 0.002, 0.0)
    assert_matches("x_next", x_next, expected_next)
    assert_matches("deriv", deriv_out, expected_deriv)
    heun = ops.guided_heun(x, deriv, d_main, None, 1.0, 5.0, 80.0, backend=backend)  # t_next > t_cur works
    assert_matches("heun", heun, heun64(x, deriv, d_main, None, 1.0, 5.0, 80.0))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_tensors(backend, device):
    x = torch.empty(0, 3, device=device)
    x_next, deriv = ops.guided_euler(x, x, x, 2.0, 1.0, 0.5, backend=backend)
    assert x_next.shape == deriv.shape == (0, 3)
    assert ops.guided_heun(x, x, x, None, 2.0, 1.0, 0.5, backend=backend).shape == (0, 3)


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
        seed=draw(st.integers(0, 2 ** 31)),
    )


@settings(max_examples=40, deadline=None)
@given(case=op_cases())
def test_property_both_ops_match_float64(case):
    (backend, device), dtype, shape = case["backend"], case["dtype"], case["shape"]
    generator = torch.Generator().manual_seed(case["seed"])
    layout = "transpose" if case["transposed"] else None
    x, d_main, d_guide, deriv = inputs_for(generator, shape, layout, dtype, device, case["t_cur"])
    d_guide = d_guide if case["with_guide"] else None
    w, t_cur, t_next = case["guidance"], case["t_cur"], case["t_next"]
    out, deriv_out = poisoned_output(shape, None, dtype, device), poisoned_output(shape, None, dtype, device)
    expected_next, expected_deriv = euler64(x, d_main, d_guide, w, t_cur, t_next)
    expected_heun = heun64(x, deriv, d_main, d_guide, w, t_cur, t_next)
    largest = max(float(e[0].abs().max()) for e in (expected_next, expected_deriv, expected_heun))
    assume(largest < torch.finfo(dtype).max / 2)  # float16 results can overflow; that is not a kernel error
    ops.guided_euler(x, d_main, d_guide, w, t_cur, t_next, out=out, deriv_out=deriv_out, backend=backend)
    assert_matches("x_next", out, expected_next)
    assert_matches("deriv", deriv_out, expected_deriv)
    heun_out = poisoned_output(shape, None, dtype, device)
    ops.guided_heun(x, deriv, d_main, d_guide, w, t_cur, t_next, out=heun_out, backend=backend)
    assert_matches("heun", heun_out, expected_heun)


# ---- bad input ----

def good_args():
    x = torch.randn(2, 3)
    return dict(x=x, d_main=torch.randn(2, 3), d_guide=torch.randn(2, 3), guidance=2.0, t_cur=1.0, t_next=0.5)


BAD_EULER = [
    (dict(d_main=torch.randn(3, 2)), ValueError, r"d_main has shape \(3, 2\), expected x's shape \(2, 3\)"),
    (dict(d_guide=torch.randn(2, 3, dtype=torch.float64)), TypeError, "d_guide has dtype torch.float64"),
    (dict(d_guide=torch.randn(2, 3, device="meta")), ValueError, "d_guide is on meta"),
    (dict(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x must have a dtype in"),
    (dict(d_main=torch.ones(2, 3, dtype=torch.int32)), TypeError, "d_main has dtype torch.int32"),
    (dict(d_main=[1.0]), TypeError, "d_main must be a tensor"),
    (dict(guidance=float("nan")), ValueError, "guidance must be finite"),
    (dict(guidance=True), TypeError, "guidance must be a real number"),
    (dict(t_cur=float("inf")), ValueError, "t_cur must be finite"),
    (dict(t_next=float("-inf")), ValueError, "t_next must be finite"),
    (dict(t_cur=0.0), ValueError, r"t_cur must be > 0, got 0.0"),
    (dict(t_cur=-1.0), ValueError, r"t_cur must be > 0"),
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton", "auto"])
@pytest.mark.parametrize("change, error, message", BAD_EULER)
def test_euler_rejects_bad_input(backend, change, error, message):
    args = dict(good_args(), **change)
    with pytest.raises(error, match=message):
        ops.guided_euler(args.pop("x"), *args.values(), backend=backend)


@pytest.mark.parametrize("change, error, message", [
    (dict(t_next=0.0), ValueError, r"t_next must be > 0"),
    (dict(deriv=torch.randn(2, 4)), ValueError, "deriv has shape"),
    (dict(out=torch.empty(2, 3, dtype=torch.float16)), TypeError, "out has dtype torch.float16"),
    (dict(out=torch.empty(6)), ValueError, "out has shape"),
])
def test_heun_rejects_bad_input(change, error, message):
    args = dict(good_args(), **{"deriv": torch.randn(2, 3), "out": None, **change})
    with pytest.raises(error, match=message):
        ops.guided_heun(args["x"], args["deriv"], args["d_main"], args["d_guide"], args["guidance"], args["t_cur"],
                        args["t_next"], out=args["out"], backend="cpp")


def test_bad_backend_names_and_devices():
    args = good_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.guided_euler(*args.values(), backend="gpu")
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
    with pytest.raises(RuntimeError, match="must be finite"):
        op.guided_heun(x, x, d_main, None, float("nan"), 1.0, 0.5)
    with pytest.raises(RuntimeError, match="t_next must be > 0"):
        op.guided_heun(x, x, d_main, None, 1.0, 1.0, 0.0)
    shared = torch.empty(4)
    with pytest.raises(RuntimeError, match="out and deriv_out must not share memory"):
        op.guided_euler_out(x, d_main, None, 1.0, 1.0, 0.5, out=shared, deriv_out=shared)
    with pytest.raises(RuntimeError, match="internal overlap|more than one element"):
        op.guided_heun_out(x, x, d_main, None, 1.0, 1.0, 0.5, out=torch.empty(1).expand(4))


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
    for name in ("reference", "cpp", "triton"):
        module = dispatch.implementation(name)
        assert callable(module.guided_euler) and callable(module.guided_heun)
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
    op = torch.ops.fastguide
    torch.library.opcheck(op.guided_euler.default, (x, d_main, d_guide, 2.0, 1.5, 0.5))
    torch.library.opcheck(op.guided_heun.default, (x, deriv, d_main, None, 2.0, 1.5, 0.5))
    torch.library.opcheck(op.guided_euler_out.default, (x, d_main, d_guide, 2.0, 1.5, 0.5),
                          dict(out=torch.empty_like(x), deriv_out=torch.empty_like(x)))
    torch.library.opcheck(op.guided_heun_out.default, (x, deriv, d_main, d_guide, 2.0, 1.5, 0.5),
                          dict(out=torch.empty_like(x)))
