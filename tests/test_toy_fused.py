"""The fused toy sampler (C++ and Triton) against fastguide.sample with the reference backend.

Each fused run is compared with the reference sampler on the same ToyModels, in float32 (the
contract: within 1e-4 on outputs of magnitude ~1, relative to the output scale for the larger
outputs of random models) and in float64 (the float64 sampler runs the models in float64).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastguide import sample
from fastguide.toy.fused import sample_toy, step_table
from fastguide.toy.model import WEIGHTS_DIR, ToyModel, load_model

TOLERANCE = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_model(hidden, seed, gain=0.15, num_layers=4):
    """A random ToyModel; the small gain keeps the sampled points at magnitude ~1-10 (larger gains
    make the random score so steep that float32 rounding is amplified along the trajectory)."""
    torch.manual_seed(seed)
    model = ToyModel(hidden=hidden, num_layers=num_layers)
    with torch.no_grad():
        model.gain.fill_(gain)
    return model.eval()


# one thread (conftest); test_cpp_threads_split_tiles_exactly checks the kernel with two
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return random_model(64, seed=1), random_model(32, seed=2, gain=0.1)


def reference_samples(main, guide, noise, dtype=torch.float32, **options):
    return sample(main, noise, guide=guide, dtype=dtype, backend="reference", **options)


def assert_close(out, expected, what):
    scale = max(1.0, expected.abs().max().item())
    error = (out.double() - expected.double()).abs().max().item()
    assert error <= TOLERANCE * scale, f"{what}: max error {error:.3g} > {TOLERANCE} x output scale {scale:.3g}"


def check_against_reference(backend, main, guide, noise, **options):
    out = sample_toy(main, guide, noise, backend=backend, **options)
    assert out.dtype == torch.float32 and out.shape == noise.shape and bool(torch.isfinite(out).all())
    assert_close(out, reference_samples(main, guide, noise, **options), f"{backend} vs float32 reference")
    assert_close(out, reference_samples(main, guide, noise, dtype=torch.float64, **options),
                 f"{backend} vs float64 reference")
    return out


CONFIGS = {
    "autoguidance-heun": dict(guidance=3.0),
    "no-guidance": dict(guidance=1.0),
    "interval-heun": dict(guidance=2.0, guidance_interval=(0.3, 5.0)),
    "interval-euler": dict(guidance=2.5, guidance_interval=(0.3, 5.0), solver="euler", num_steps=20),
    "custom-schedule": dict(guidance=1.5, sigmas=torch.tensor([40.0, 7.0, 1.5, 0.3, 0.05, 0.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("config, n", [(config, 100) for config in CONFIGS] + [("autoguidance-heun", 1),
                                                                             ("interval-heun", 37)])
def test_cpp_matches_reference(models, generator, config, n):
    noise = torch.randn(n, 2, generator=generator)
    check_against_reference("cpp", *models, noise, **CONFIGS[config])


def test_cpp_threads_split_tiles_exactly(models, generator):
    """Tiles are independent: two threads give bit-identical results to one."""
    noise = torch.randn(500, 2, generator=generator)
    one = sample_toy(*models, noise, guidance=3.0, num_steps=8)
    torch.set_num_threads(2)
    assert torch.equal(sample_toy(*models, noise, guidance=3.0, num_steps=8), one)


def test_cpp_non_contiguous_and_other_dtypes(models, generator):
    noise64 = torch.randn(2, 53, generator=generator, dtype=torch.float64).t()  # [53, 2], not contiguous
    assert not noise64.is_contiguous()
    out = check_against_reference("cpp", *models, noise64, guidance=3.0, num_steps=12)
    assert torch.equal(out, sample_toy(*models, noise64.float().contiguous(), guidance=3.0, num_steps=12))
    noise16 = noise64.half()
    assert torch.equal(sample_toy(*models, noise16, guidance=3.0, num_steps=12),
                       sample_toy(*models, noise16.float(), guidance=3.0, num_steps=12))


def test_cpp_interval_edges_follow_reference_semantics(models, generator):
    """Guidance applies for lo < σ ≤ hi: put both ends exactly on schedule values."""
    sigmas = torch.tensor([20.0, 5.0, 2.0, 0.7, 0.2, 0.05, 0.0], dtype=torch.float64)
    noise = torch.randn(40, 2, generator=generator)
    for interval in [(0.2, 2.0), (0.7, 20.0), (0.05, 0.7)]:
        for solver in ("euler", "heun"):
            check_against_reference("cpp", *models, noise, guidance=4.0, guidance_interval=interval, sigmas=sigmas,
                                    solver=solver)


def test_step_table_marks_guided_evaluations():
    t_steps = [20.0, 5.0, 2.0, 0.7, 0.0]
    table = step_table(t_steps, 2.0, (0.7, 5.0), "heun")
    # rows: (t_hat, t_next, guided_euler, guided_heun, heun); guided where 0.7 < σ <= 5
    expected = [[20.0, 5.0, 0, 1, 1], [5.0, 2.0, 1, 1, 1], [2.0, 0.7, 1, 0, 1], [0.7, 0.0, 0, 0, 0]]
    assert table.tolist() == expected
    assert not step_table(t_steps, 1.0, None, "heun")[:, 2:4].any()
    assert not step_table(t_steps, 2.0, None, "euler")[:, 3:5].any()


def test_cpp_does_not_run_the_guide_when_unguided(models, generator):
    """guidance == 1: the guide is never evaluated, so a NaN guide changes nothing."""
    main, _ = models
    broken = random_model(32, seed=3)
    with torch.no_grad():
        broken.weights[1].fill_(float("nan"))
    noise = torch.randn(30, 2, generator=generator)
    out = sample_toy(main, broken, noise, guidance=1.0, num_steps=8)
    assert torch.equal(out, sample_toy(main, None, noise, guidance=1.0, num_steps=8))
    assert bool(torch.isnan(sample_toy(main, broken, noise, guidance=2.0, num_steps=8)).all())


def test_cpp_general_hidden_and_depth(generator):
    """Other sizes the C++ kernel takes: hidden 16/48, 2 and 6 hidden layers, a CFG-style guide."""
    main = random_model(48, seed=4, num_layers=6)
    guide = random_model(16, seed=5, num_layers=2, gain=0.2)
    noise = torch.randn(29, 2, generator=generator)
    check_against_reference("cpp", main, guide, noise, guidance=2.0, num_steps=10)


@pytest.mark.skipif(not all(os.path.exists(os.path.join(WEIGHTS_DIR, f"{name}.safetensors"))
                            for name in ("main", "guide_auto")), reason="shipped toy weights are not built yet")
def test_cpp_shipped_models_within_1e4(generator):
    main, guide = load_model("main"), load_model("guide_auto")
    noise = torch.randn(200, 2, generator=generator)
    out = sample_toy(main, guide, noise, guidance=3.0)
    expected = reference_samples(main, guide, noise, guidance=3.0)
    assert (out - expected).abs().max().item() <= TOLERANCE


# The Triton kernel under the interpreter (TRITON_INTERPRET=1 from conftest): small and few runs.
requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                          reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


@requires_interpreter
@pytest.mark.parametrize("config", [dict(guidance=3.0, num_steps=6),
                                    dict(guidance=2.0, guidance_interval=(0.3, 5.0), solver="euler", num_steps=8)])
def test_triton_matches_reference(models, generator, config):
    noise = torch.randn(37, 2, generator=generator)
    check_against_reference("triton", *models, noise, **config)


@requires_interpreter
def test_triton_several_programs_and_masked_tail(models, generator):
    """block=16 over 37 points: three programs, the last one masked; a guide of another depth."""
    from fastguide.toy import triton_sampler as toy_sampler
    noise = torch.randn(37, 2, generator=generator)
    main, guide = models[0], random_model(16, seed=8, num_layers=2, gain=0.2)
    table = step_table([8.0, 1.0, 0.1, 0.0], 3.0, None, "heun")
    x = noise * 8.0
    args = (x, main.effective_weights(), main.gain_value(), main.sigma_data, guide.effective_weights(),
            guide.gain_value(), guide.sigma_data, table, 3.0)
    out = toy_sampler.toy_sample(*args, block=16)
    assert_close(out, reference_samples(main, guide, noise, guidance=3.0, sigmas=torch.tensor([8.0, 1.0, 0.1, 0.0])),
                 "triton block=16")
    assert torch.equal(x, noise * 8.0), "the kernel must not write its input"


COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from fastguide.toy import triton_sampler as toy_sampler
    kernel = toy_sampler._toy_sampler_kernel
    constexprs = {"HM": 64, "HG": 32, "LM": 4, "LG": 4, "SLOPES": 3 * 64 * 64, "BLOCK": 64,
                  "PRECISION": toy_sampler.DOT_PRECISION}
    signature = {name: "*fp32" if name.endswith("_ptr") else "i32" if name in ("n", "num_evals") else "fp32"
                 for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    for capability in (90, 80):
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        print(capability, compiled.metadata.shared, len(compiled.asm["cubin"]), f".target sm_{capability}" in ptx,
              ptx.count("ex2.approx"), ptx.count("mma."))
""")
# Shared memory one block may use: 227 KiB on sm_90 (H100), 163 KiB on sm_80 (A100).
SHARED_LIMIT = {90: 232448, 80: 166912}


def test_triton_compiles_for_sm90_and_sm80():
    """The real kernel (hidden 64 + 32, 64 points per program) compiles to cubins for sm_90 and
    sm_80 without a GPU, on tensor cores, within the shared memory a block may use (in a
    subprocess: TRITON_INTERPRET=1 here replaces the compiler).  Running it needs a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    assert [int(line[0]) for line in lines] == [90, 80]
    for capability, shared, cubin_size, target_ok, exps, mmas in lines:
        assert target_ok == "True" and int(cubin_size) > 0
        assert 0 < int(shared) <= SHARED_LIMIT[int(capability)], f"sm_{capability}: {shared} bytes of shared memory"
        assert int(exps) > 0 and int(mmas) > 0, "expected silu's exp and tensor-core products in the PTX"


# Bad input: clear errors before any work.
@pytest.mark.parametrize("call, error, match", [
    (lambda m, g, z: sample_toy(m, g, z.reshape(-1)), ValueError, r"noise must have shape \[N, 2\]"),
    (lambda m, g, z: sample_toy(m, g, torch.zeros(0, 2)), ValueError, "N >= 1"),
    (lambda m, g, z: sample_toy(m, g, z.long()), TypeError, "noise must be a floating-point tensor"),
    (lambda m, g, z: sample_toy(m, g, z.tolist()), TypeError, "noise must be a floating-point tensor"),
    (lambda m, g, z: sample_toy(torch.nn.Linear(2, 2), g, z), TypeError, "main must be a fastguide.toy.ToyModel"),
    (lambda m, g, z: sample_toy(m, lambda x, s: x, z, guidance=2.0), TypeError, "guide must be a fastguide.toy"),
    (lambda m, g, z: sample_toy(m, None, z, guidance=2.0), ValueError, "needs a guide model"),
    (lambda m, g, z: sample_toy(m, g, z, guidance=float("nan")), ValueError, "guidance must be finite"),
    (lambda m, g, z: sample_toy(m, g, z, guidance="3"), TypeError, "guidance must be a real number"),
    (lambda m, g, z: sample_toy(m, g, z, guidance=2.0, guidance_interval=(5.0, 1.0)), ValueError, "sigma_lo < sigma_hi"),
    (lambda m, g, z: sample_toy(m, g, z, solver="rk4"), ValueError, "solver must be one of"),
    (lambda m, g, z: sample_toy(m, g, z, num_steps=0), ValueError, "num_steps must be an integer >= 1"),
    (lambda m, g, z: sample_toy(m, g, z, sigmas=torch.tensor([1.0, 2.0, 0.0])), ValueError, "strictly decreasing"),
    (lambda m, g, z: sample_toy(m, g, z, backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_is_refused(models, call, error, match):
    main, guide = models
    with pytest.raises(error, match=match):
        call(main, guide, torch.randn(5, 2))


def test_backends_refuse_unsupported_models(models):
    main, guide = models
    odd = random_model(24, seed=6)
    with pytest.raises(ValueError, match="hidden=24; the cpp kernel needs a multiple of 16"):
        sample_toy(odd, guide, torch.randn(5, 2), guidance=2.0, backend="cpp")
    with pytest.raises(ValueError, match="guide has hidden=24; the triton kernel needs a power of two"):
        sample_toy(main, odd, torch.randn(5, 2), guidance=2.0, backend="triton")
    with pytest.warns(RuntimeWarning, match="using the reference sampler"):
        out = sample_toy(odd, None, torch.randn(5, 2), num_steps=4)
    assert out.shape == (5, 2)


def test_reference_backend_is_fastguide_sample(models, generator):
    noise = torch.randn(9, 2, generator=generator)
    out = sample_toy(*models, noise, guidance=2.0, num_steps=5, backend="reference")
    assert torch.equal(out, reference_samples(*models, noise, guidance=2.0, num_steps=5))


def test_cpp_op_refuses_bad_arguments():
    """The op checks its own arguments too (it is public as torch.ops.fastguide_toy.sample)."""
    op = torch.ops.fastguide_toy.sample
    x, steps = torch.zeros(3, 2), torch.ones(1, 5, dtype=torch.float64)
    w0, w = torch.ones(16, 4), torch.ones(16, 16)
    with pytest.raises(RuntimeError, match=r"x must be a CPU float32 tensor of shape \[N, 2\]"):
        op(x.double(), [w0, w], 0.0, 0.5, [], 0.0, 0.5, steps, 1.0)
    with pytest.raises(RuntimeError, match=r"main: weight 1 must be \[16, 16\]"):
        op(x, [w0, torch.ones(16, 8)], 0.0, 0.5, [], 0.0, 0.5, steps, 1.0)
    with pytest.raises(RuntimeError, match="hidden size must be a positive multiple of 16"):
        op(x, [torch.ones(24, 4), torch.ones(24, 24)], 0.0, 0.5, [], 0.0, 0.5, steps, 1.0)
    with pytest.raises(RuntimeError, match="guided steps need guide weights"):
        op(x, [w0, w], 0.0, 0.5, [], 0.0, 0.5, steps, 1.0)
    with pytest.raises(RuntimeError, match="needs positive noise levels"):
        op(x, [w0, w], 0.0, 0.5, [], 0.0, 0.5, torch.zeros(1, 5, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match=r"schedule must be \[steps, 5\]"):
        op(x, [w0, w], 0.0, 0.5, [], 0.0, 0.5, torch.ones(5), 1.0)
