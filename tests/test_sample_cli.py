"""`fastguide sample` end to end: files per seed, resume after a kill, the manifest and unreadable files on
rerun, atomic and concurrent writes, failures during sampling, sharding (torchrun, two nodes), bad input."""
import errno
import glob
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastguide
from fastguide import rules, sample_cli
from fastguide._threads import torch_threads
from fastguide.cli import main
from nets_for_cli import TinyNet

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
COMMON = ["--net", "nets_for_cli:tiny_net", "--seeds", "0-11", "--batch", "2", "--steps", "4",
          "--guidance", "2", "--format", "npz"]
SEEDS = list(range(12))


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def result_files(outdir, ext="npz"):
    """The visible per-seed results (temporary files are hidden, dot-prefixed)."""
    return sorted(glob.glob(os.path.join(outdir, "*", f"*.{ext}")))


def file_ids(paths):
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def read_bytes(paths):
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def error_lines(err):
    """The CLI's error lines in captured stderr (tqdm's progress bar writes there too)."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("fastguide sample: error: ")]


def records(outdir):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(outdir, "run-*.json")))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One in-process run over seeds 0-11 (CFG on the class-conditional tiny net); returns its folder."""
    outdir = str(tmp_path_factory.mktemp("reference") / "out")
    with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
        assert main(["sample", *COMMON, "--outdir", outdir]) == 0
    return outdir


def expected_samples(net, seeds, guidance, num_classes=4, class_idx=None, steps=4, null_class=None, replay=False,
                     **options):
    """What a batch of seeds should give: from torch.Generator(seed), each seed's noise, then its class, then
    the noise that churn and ancestral steps add (replay: a fresh generator's, the initial noise again)."""
    randn = fastguide.SeededRandn(seeds)
    noise = randn.randn((3, 8, 8))
    classes = [class_idx if class_idx is not None else int(torch.randint(num_classes, size=(), generator=generator))
               for generator in randn.generators]
    labels = torch.eye(num_classes)[classes]
    if "guide" not in options and guidance != 1:
        options["guide_labels"] = torch.zeros_like(labels)
        if null_class is not None:
            options["guide_labels"][:, null_class] = 1
    with torch.no_grad():
        x = fastguide.sample(net, noise, labels=labels, guidance=guidance, num_steps=steps,
                             randn_like=fastguide.SeededRandn(seeds) if replay else randn, **options)
    return x, classes


def max_rel_err(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_one_file_per_seed_with_the_seeds_own_noise_and_class(reference_run):
    files = result_files(reference_run)
    assert [os.path.basename(p) for p in files] == [f"{s:06d}.npz" for s in SEEDS]
    net = TinyNet(seed=0).eval()
    all_classes = set()
    for first in range(0, 12, 2):  # the CLI's batches of 2
        with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
            x, classes = expected_samples(net, [first, first + 1], guidance=2.0)
        for row in range(2):
            with np.load(files[first + row]) as data:
                assert sorted(data.files) == ["class_label", "seed", "x"]
                assert int(data["seed"]) == first + row and int(data["class_label"]) == classes[row]
                assert data["x"].dtype == np.float32 and data["x"].shape == (3, 8, 8)
                assert max_rel_err(data["x"], x[row].numpy()) < 1e-6
        all_classes.update(classes)
    assert len(all_classes) > 1  # the classes really are drawn per seed
    (record,) = records(reference_run)
    assert record["arguments"]["seeds"] == "0-11" and record["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__
    assert record["backend"] in fastguide.dispatch.NAMES
    assert record["resolved"]["strategy"] == "cfg-batch"
    assert record["counts"]["written"] == 12 and record["counts"]["batches_run"] == 6
    assert record["counts"]["evaluations_per_sample"] == {"net": 7, "guide": 7}  # Heun: 2·4 − 1
    assert record["timings"]["sampling_s"] > 0


def test_png_with_guide_interval_and_fixed_class(tmp_path):
    outdir = str(tmp_path / "png")
    argv = ["sample", "--net", "nets_for_cli:tiny_net", "--guide", "nets_for_cli:tiny_guide", "--guidance", "1.8",
            "--interval", "0.3", "5", "--seeds", "3,5-6", "--steps", "5", "--solver", "euler", "--class", "2",
            "--outdir", outdir]
    assert main(argv) == 0
    from PIL import Image
    net, guide = TinyNet(seed=0).eval(), TinyNet(seed=1).eval()
    x, _ = expected_samples(net, [3, 5, 6], 1.8, class_idx=2, steps=5, guide=guide, guidance_interval=(0.3, 5.0),
                            solver="euler")
    for row, seed in enumerate((3, 5, 6)):
        image = np.asarray(Image.open(os.path.join(outdir, "000000", f"{seed:06d}.png")))
        pixels = (x[row] * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - pixels.astype(int)).max() <= 1
    (record,) = records(outdir)
    per_sample = record["counts"]["evaluations_per_sample"]
    assert per_sample["net"] == 5 and 0 < per_sample["guide"] < 5  # the guide is skipped outside (0.3, 5]


def test_diffusers_net_with_null_class_cfg(tmp_path):
    """A DiffusersDenoiser factory: labels from its label_dim, CFG against --null-class, σ range clamped."""
    outdir = str(tmp_path / "diffusers")
    assert main(["sample", "--net", "nets_for_cli:diffusers_unet", "--seeds", "4-6", "--steps", "3", "--batch", "3",
                 "--guidance", "1.5", "--null-class", "4", "--format", "npz", "--outdir", outdir]) == 0
    from nets_for_cli import diffusers_unet
    net = diffusers_unet()
    (record,) = records(outdir)
    assert record["resolved"]["num_classes"] == 5
    assert record["resolved"]["sigma_min"] == pytest.approx(net.sigma_min)  # the net's range is narrower
    assert record["resolved"]["sigma_max"] == 80.0
    x, classes = expected_samples(net, [4, 5, 6], 1.5, num_classes=5, steps=3, null_class=4,
                                  sigma_min=net.sigma_min, sigma_max=80.0)
    for row, path in enumerate(result_files(outdir)):
        with np.load(path) as data:
            assert int(data["class_label"]) == classes[row]
            assert max_rel_err(data["x"], x[row].numpy()) < 1e-5


def test_gray_png_needs_shape_and_writes_one_channel(tmp_path):
    outdir = str(tmp_path / "gray")
    assert main(["sample", "--net", "nets_for_cli:gray_net", "--shape", "1,5,6", "--seeds", "0-2", "--steps", "3",
                 "--outdir", outdir]) == 0
    from PIL import Image
    images = [Image.open(p) for p in result_files(outdir, "png")]
    assert [(im.mode, im.size) for im in images] == [("L", (6, 5))] * 3


def test_rerun_skips_existing_and_refills_missing_identically(reference_run, tmp_path, capsys):
    outdir = str(tmp_path / "copy")
    shutil.copytree(reference_run, outdir)
    before = read_bytes(result_files(outdir))
    ids = file_ids(result_files(outdir))
    with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
        assert main(["sample", *COMMON, "--outdir", outdir]) == 0
    assert file_ids(result_files(outdir)) == ids  # nothing was rewritten
    assert records(outdir)[-1]["counts"] == dict(records(outdir)[-1]["counts"], written=0, skipped=12, batches_run=0)
    removed = [os.path.join(outdir, "000000", name) for name in ("000003.npz", "000008.npz")]
    for path in removed:
        os.remove(path)
    with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
        assert main(["sample", *COMMON, "--outdir", outdir]) == 0
    assert read_bytes(result_files(outdir)) == before
    kept = {p: v for p, v in ids.items() if p not in removed}
    assert {p: v for p, v in file_ids(result_files(outdir)).items() if p not in removed} == kept
    assert records(outdir)[-1]["counts"]["written"] == 2


def test_killed_run_resumes_without_loss_or_repeats(reference_run, tmp_path, monkeypatch):
    outdir = str(tmp_path / "killed")
    argv = ["sample", *COMMON, "--outdir", outdir]
    argv[argv.index("nets_for_cli:tiny_net")] = "nets_for_cli:slow_net"  # the same weights, sleeping per call
    command = [sys.executable, "-m", "fastguide", *argv]
    process = subprocess.Popen(command, env=subprocess_env(FASTGUIDE_TEST_DELAY="0.1"), cwd=str(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150  # interpreter start-up alone can take ~20 s on a busy machine
        while len(result_files(outdir)) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    written = result_files(outdir)
    assert 4 <= len(written) < 12
    for path in written:  # every visible result is whole
        with np.load(path) as data:
            assert data["x"].shape == (3, 8, 8)
    ids = file_ids(written)
    monkeypatch.setenv("FASTGUIDE_TEST_DELAY", "0")
    with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
        assert main(argv) == 0
    final = result_files(outdir)
    assert [os.path.basename(p) for p in final] == [f"{s:06d}.npz" for s in SEEDS]
    assert not glob.glob(os.path.join(outdir, "*", ".*"))  # no temporary files left
    assert {p: file_ids(final)[p] for p in written} == ids  # the first run's files were kept
    assert read_bytes(final) == read_bytes(result_files(reference_run))  # same as an uninterrupted run


def test_torchrun_two_processes_write_the_same_bytes(reference_run, tmp_path):
    outdir = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastguide", "sample", *COMMON, "--outdir", outdir]
    result = subprocess.run(command, env=subprocess_env(), cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run))
    (record,) = records(outdir)
    assert record["world_size"] == 2
    assert sorted(r["rank"] for r in record["ranks"]) == [0, 1]
    assert [r["written"] for r in sorted(record["ranks"], key=lambda r: r["rank"])] == [6, 6]
    assert record["counts"]["written"] == 12


BAD_INPUTS = {
    "no module": (["--net", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    "no colon": (["--net", "nets_for_cli"], "expected MODULE:FACTORY"),
    "no attribute": (["--net", "nets_for_cli:missing"], "has no attribute 'missing'"),
    "not callable factory": (["--net", "nets_for_cli:NOT_CALLABLE"], "not a callable factory"),
    "factory raises": (["--net", "nets_for_cli:broken_factory"], "raised RuntimeError: weights not found"),
    "returns no denoiser": (["--guide", "nets_for_cli:not_a_denoiser"], "returned a int, expected a callable"),
    "seed range open": (["--seeds", "0-"], "--seeds: malformed item '0-'"),
    "seed range reversed": (["--seeds", "9-2"], "ends before it starts"),
    "seed list word": (["--seeds", "1,two"], "--seeds: malformed item 'two'"),
    "seed twice": (["--seeds", "0-3,2"], "more than once"),
    "too many seeds": (["--seeds", "0-20000000"], "names more than 10000000 seeds"),
    "seed aliasing a smaller one": (["--seeds", "0,4294967301"], "seed 4294967301 is too large (must be < 2**32: "
                                                                  "torch's CPU generator keeps 32 bits of a seed, so "
                                                                  "seed 4294967301 would draw the noise of seed 5)"),
    "no alphas_cumprod": (["--net", "nets_for_cli:diffusers_flow_match"], "has no alphas_cumprod"),
    "class out of range": (["--class", "4"], "--class 4 needs --num-classes"),
    "png channels": (["--net", "nets_for_cli:gray_net", "--shape", "2,4,4", "--format", "png"], "C = 1, 3 or 4"),
    # checked before the net is loaded: a factory that fails is not reached
    "png needs C,H,W": (["--net", "nets_for_cli:broken_factory", "--shape", "3,8"], "shape C,H,W"),
    "png with a 4-d shape": (["--net", "nets_for_cli:broken_factory", "--shape", "3,4,4,4"], "shape C,H,W"),
    "meta device": (["--net", "nets_for_cli:broken_factory", "--device", "meta"], "--device meta: cannot sample"),
    "seed range with spaces": (["--seeds", "1 - 3"], "--seeds: malformed item '1 - 3'"),
    "seeds split by a space": (["--seeds", "1 2"], "--seeds: malformed item '1 2'"),
    "non-ASCII digits": (["--seeds", "\u0661-\u0663"], "--seeds: malformed item"),
    "seed of 5000 digits": (["--seeds", "9" * 5000], "--seeds: malformed item"),
    "factory exits": (["--net", "nets_for_cli:exiting_factory"], "exiting_factory() raised SystemExit: 3"),
    "no shape": (["--net", "nets_for_cli:gray_net"], "--shape C,H,W is needed"),
    "guidance without guide": (["--net", "nets_for_cli:gray_net", "--shape", "1,4,4", "--guidance", "2"],
                               "needs --guide"),
    "bad interval": (["--interval", "3", "1"], "LO < HI"),
    "bad steps": (["--steps", "0"], "--steps must be >= 1"),
    "cfg-batch with guide": (["--guide", "nets_for_cli:tiny_guide", "--strategy", "cfg-batch"], "is for CFG"),
    # solver options that do not apply, or bad values: before the net is loaded
    "eta with heun": (["--net", "nets_for_cli:broken_factory", "--eta", "0.5"],
                      "--eta applies with --solver euler_ancestral only (here --solver heun)"),
    "churn with dpmpp_2m": (["--net", "nets_for_cli:broken_factory", "--solver", "dpmpp_2m", "--churn", "1"],
                            "--churn applies with --solver euler or heun only"),
    "churn with ancestral": (["--solver", "euler_ancestral", "--churn", "1"], "--churn applies with --solver euler"),
    "s-min without churn": (["--s-min", "0.1"], "--s-min applies with --churn only"),
    "s-max without churn": (["--s-max", "10"], "--s-max applies with --churn only"),
    "s-noise with plain heun": (["--s-noise", "1.01"], "--s-noise applies with --churn or --solver euler_ancestral"),
    "negative churn": (["--churn", "-1"], "--churn must be >= 0.0, got -1.0"),
    "negative eta": (["--solver", "euler_ancestral", "--eta", "-0.1"], "--eta must be >= 0.0"),
    "nan s-noise": (["--solver", "euler_ancestral", "--s-noise", "nan"], "--s-noise must be finite"),
    "s-min above s-max": (["--churn", "5", "--s-min", "3", "--s-max", "1"], "--s-min must be <= --s-max"),
    "ancestral for a flow": (["--net", "nets_for_cli:flow_like_net", "--solver", "euler_ancestral"],
                             "--solver euler_ancestral does not suit the --net denoiser: solver='euler_ancestral' "
                             "adds noise as x = x0 + σ·ε, but net declares signal_scale"),
    "churn for a flow": (["--net", "nets_for_cli:flow_like_net", "--churn", "1"],
                         "--churn does not suit the --net denoiser: S_churn adds noise"),
    "rule-arg without rule": (["--net", "nets_for_cli:broken_factory", "--rule-arg", "phi=0.5"],
                              "--rule-arg phi=0.5 needs --rule NAME"),
    # factories that give conditioning, shape or schedule
    "class with factory conditioning": (["--net", "nets_for_cli:prompted", "--class", "1"],
                                        "--class does not apply: the --net factory gives the conditioning"),
    "rho with factory schedule": (["--net", "nets_for_cli:prompted", "--rho", "5"],
                                  "--rho does not apply: the --net factory gives the schedule"),
    "CFG without guide_labels": (["--net", "nets_for_cli:labels_only", "--shape", "3,8,8", "--guidance", "2"],
                                 "guide_labels from the --net factory's conditioning"),
    "conditioning of the wrong batch": (["--net", "nets_for_cli:one_row_conditioning", "--seeds", "0-1",
                                         "--shape", "3,8,8"], "conditioning(0-1): labels['emb'] has batch (1,)"),
    "misspelt factory key": (["--net", "nets_for_cli:misspelt_dict"], "returned a dict with key 'sigma'"),
    "schedule of the wrong length": (["--net", "nets_for_cli:short_schedule"], "sigmas(2) gave 2 noise levels; "
                                                                              "expected --steps + 1 = 3"),
    "factory shape with a zero": (["--net", "nets_for_cli:zero_size_shape"], "its shape must be a sequence"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    options, message = BAD_INPUTS[case]
    outdir = tmp_path / "out"
    argv = ["sample", "--net", "nets_for_cli:tiny_net", "--seeds", "0-1", "--steps", "2", "--outdir", str(outdir)]
    assert main(argv + options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastguide sample: error: ")
    assert message in err
    assert not outdir.exists()


def test_unwritable_outdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["sample", "--net", "nets_for_cli:tiny_net", "--seeds", "0", "--outdir", str(blocker / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--outdir" in err and "is not a folder" in err
    assert blocker.read_text() == "not a folder"


def block_subfolder(outdir):
    (outdir / "000000").write_text("a file where the seeds' folder goes")


def folder_at_seed_path(outdir):
    (outdir / "000000" / "000001.npz").mkdir(parents=True)


def read_only_subfolder(outdir):
    (outdir / "000000").mkdir()
    (outdir / "000000").chmod(0o555)


@pytest.mark.parametrize("spoil, message", [
    (block_subfolder, "000000' is not a folder"),
    (folder_at_seed_path, "the paths of seeds 1 are folders"),
    pytest.param(read_only_subfolder, "000000' is not writable", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only folders")),
])
def test_output_folder_problems_are_refused_before_loading(spoil, message, tmp_path, capsys):
    """Refused before the net is loaded (its factory, which fails, is never called), nothing written."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    spoil(outdir)
    before = sorted(str(p) for p in outdir.rglob("*"))
    argv = ["sample", "--net", "nets_for_cli:broken_factory", "--seeds", "0-2", "--format", "npz",
            "--outdir", str(outdir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastguide sample: error: --outdir") and message in err
    assert sorted(str(p) for p in outdir.rglob("*")) == before


def test_exit_code_2_from_python_m_fastguide(tmp_path, monkeypatch, capsys):
    """`python -m fastguide sample ...` (run in-process: a new interpreter costs ~10 s here)."""
    monkeypatch.setattr(sys, "argv", ["fastguide", "sample", "--net", "nets_for_cli:tiny_net", "--seeds", "3-x",
                                      "--outdir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("fastguide", run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "fastguide sample: error: --seeds: malformed item '3-x' in '3-x' (expected e.g. 0-49999 or 0,5,10-19)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- solvers that add noise, rules, factories

NOISY_SOLVERS = {
    "ancestral": (["--solver", "euler_ancestral", "--eta", "0.8", "--s-noise", "1.01"],
                  dict(solver="euler_ancestral", eta=0.8, S_noise=1.01)),
    "churn": (["--solver", "heun", "--churn", "30", "--s-min", "0.05", "--s-max", "40", "--s-noise", "1.003"],
              dict(solver="heun", S_churn=30.0, S_min=0.05, S_max=40.0, S_noise=1.003)),
}


@pytest.mark.parametrize("case", sorted(NOISY_SOLVERS))
def test_added_noise_is_per_seed_and_not_the_initial_noise(case, tmp_path):
    """The noise of ancestral steps and churn continues each seed's generator: the same bytes for any
    batch size, and not a replay of the seed's initial noise."""
    options, keywords = NOISY_SOLVERS[case]
    outdirs = {batch: str(tmp_path / f"batch{batch}") for batch in (12, 5)}
    for batch, outdir in outdirs.items():
        assert run_common(*options, "--batch", str(batch), outdir=outdir) == 0
    assert read_bytes(result_files(outdirs[5])) == read_bytes(result_files(outdirs[12]))
    net = TinyNet(seed=0).eval()
    with torch_threads(1):
        x, _ = expected_samples(net, SEEDS, 2.0, **keywords)
        replayed, _ = expected_samples(net, SEEDS, 2.0, replay=True, **keywords)
        deterministic, _ = expected_samples(net, SEEDS, 2.0, solver=keywords["solver"])
    files = result_files(outdirs[12])
    for row, path in enumerate(files):
        with np.load(path) as data:
            assert max_rel_err(data["x"], x[row].numpy()) < 1e-6
    assert max_rel_err(replayed.numpy(), x.numpy()) > 1e-2  # a replay of the initial noise is another sample
    assert max_rel_err(deterministic.numpy(), x.numpy()) > 1e-2  # noise was added
    settings = json.load(open(os.path.join(outdirs[12], "manifest.json")))["settings"]
    expected = dict(eta=1.0, churn=0.0, s_min=0.0, s_max=None, s_noise=1.0)
    expected.update({dict(S_churn="churn", S_min="s_min", S_max="s_max", S_noise="s_noise").get(k, k): v
                     for k, v in keywords.items() if k != "solver"})
    assert {key: settings[key] for key in expected} == expected


def test_rule_and_its_parameters_are_sampled_and_recorded(reference_run, tmp_path):
    outdir = str(tmp_path / "apg")
    assert run_common("--seeds", "0-3", "--rule", "apg", "--rule-arg", "momentum=0.5", "--rule-arg",
                      " norm_threshold = 15", outdir=outdir) == 0
    net, files = TinyNet(seed=0).eval(), result_files(outdir)
    for first in (0, 2):  # the CLI's batches of 2
        with torch_threads(1):
            x, _ = expected_samples(net, [first, first + 1], 2.0, guidance_rule=rules.APG(momentum=0.5,
                                                                                           norm_threshold=15))
        for row in range(2):
            with np.load(files[first + row]) as data:
                assert max_rel_err(data["x"], x[row].numpy()) < 1e-6
    lerp = np.stack([np.load(path)["x"] for path in result_files(reference_run)[:4]])
    assert max_rel_err(np.stack([np.load(path)["x"] for path in files]), lerp) > 1e-3  # the rule took effect
    settings = json.load(open(os.path.join(outdir, "manifest.json")))["settings"]
    assert settings["rule"] == dict(name="apg", eta=1.0, norm_threshold=15.0, momentum=0.5, space="eps")


BAD_RULES = {
    "unknown rule": (["--rule", "apgx"], "--rule: unknown rule 'apgx'; choose one of lerp, cfg_rescale, apg, "
                                         "cfg_zero_star"),
    "unknown parameter": (["--rule", "apg", "--rule-arg", "phi=0.5"],
                          "--rule-arg phi=0.5: rule apg has no parameter 'phi' (it takes: eta, norm_threshold, "
                          "momentum, space)"),
    "not a number": (["--rule", "cfg_rescale", "--rule-arg", "phi=high"], "--rule-arg phi=high: expected a number"),
    "not an integer": (["--rule", "cfg_zero_star", "--rule-arg", "zero_init_steps=1.5"],
                       "--rule-arg zero_init_steps=1.5: expected an integer"),
    "out of range": (["--rule", "apg", "--rule-arg", "momentum=2"], "--rule apg: momentum must lie in (-1, 1)"),
    "unknown space": (["--rule", "apg", "--rule-arg", "space=flow"], "--rule apg: space must be one of"),
    "given twice": (["--rule", "apg", "--rule-arg", "eta=0", "--rule-arg", "eta=1"], "'eta' is given more than once"),
    "no value": (["--rule", "apg", "--rule-arg", "eta"], "--rule-arg: expected PARAM=VALUE, got 'eta'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RULES))
def test_bad_rule_is_refused_before_loading(case, tmp_path, capsys):
    options, message = BAD_RULES[case]
    outdir = tmp_path / "out"
    argv = ["sample", "--net", "nets_for_cli:broken_factory", "--guidance", "2", "--outdir", str(outdir)]
    assert main(argv + options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastguide sample: error: ") and message in err
    assert not outdir.exists()


def test_factory_with_conditioning_and_schedule(tmp_path):
    """A factory dict: conditioning per seed (prompt k mod 5, keyword emb), CFG against its guide_labels,
    its shape and its sigmas(--steps); the same as sampling each batch directly."""
    from nets_for_cli import KeywordNet, prompt_conditioning, prompt_sigmas
    outdir = str(tmp_path / "prompted")
    assert main(["sample", "--net", "nets_for_cli:prompted", "--seeds", "0-6", "--batch", "3", "--steps", "5",
                 "--guidance", "2.5", "--format", "npz", "--outdir", outdir]) == 0
    net, files = KeywordNet(seed=0).eval(), result_files(outdir)
    for first in range(0, 7, 3):
        seeds = list(range(first, min(first + 3, 7)))
        labels, guide_labels = prompt_conditioning(seeds, "cpu")
        with torch.no_grad():
            x = fastguide.sample(net, fastguide.seeded_noise(seeds, (3, 8, 8)), labels=labels,
                                 guide_labels=guide_labels, guidance=2.5, sigmas=prompt_sigmas(5))
        for row, seed in enumerate(seeds):
            with np.load(files[seed]) as data:
                assert int(data["class_label"]) == -1
                assert np.array_equal(data["x"], x[row].numpy())
    settings = json.load(open(os.path.join(outdir, "manifest.json")))["settings"]
    assert settings["sigmas"] == prompt_sigmas(5).tolist()
    assert (settings["sigma_min"], settings["sigma_max"], settings["rho"], settings["num_classes"]) == \
        (None, None, None, 0)


def test_factory_object_without_schedule_gets_edm_clamped(tmp_path):
    """An object with denoiser and conditioning attributes; EDM's schedule, clamped to its net's sigma_max."""
    from nets_for_cli import KeywordNet, prompt_conditioning
    outdir = str(tmp_path / "object")
    assert main(["sample", "--net", "nets_for_cli:PromptedModel", "--seeds", "3-4", "--steps", "4",
                 "--format", "npz", "--outdir", outdir]) == 0
    labels, _ = prompt_conditioning([3, 4], "cpu")
    with torch.no_grad():
        x = fastguide.sample(KeywordNet(seed=0).eval(), fastguide.seeded_noise([3, 4], (3, 8, 8)), labels=labels,
                             num_steps=4, sigma_max=20.0)
    for row, path in enumerate(result_files(outdir)):
        with np.load(path) as data:
            assert np.array_equal(data["x"], x[row].numpy())
    assert json.load(open(os.path.join(outdir, "manifest.json")))["settings"]["sigma_max"] == 20.0


def test_flow_model_from_a_factory_equals_direct_sampling(tmp_path):
    """flow_for_cli:tiny_sd3 (SD3 transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), its prompts and
    flow_sigmas): the CLI's files are fastguide.sample(FlowMatchDenoiser(...), sigmas=flow_sigmas(...))
    of each seed's noise and conditioning, bit for bit batch by batch, and to float rounding in one batch."""
    pytest.importorskip("diffusers")
    import flow_for_cli
    from fastguide.adapters import FlowMatchDenoiser, flow_sigmas
    outdir = str(tmp_path / "flow")
    with torch_threads(1):
        assert main(["sample", "--net", "flow_for_cli:tiny_sd3", "--seeds", "0-4", "--batch", "2", "--steps", "4",
                     "--solver", "euler", "--guidance", "4", "--format", "npz", "--outdir", outdir]) == 0
    model, scheduler = flow_for_cli.model_and_scheduler()
    denoiser, files = FlowMatchDenoiser(model, scheduler), result_files(outdir)

    def direct(seeds):
        labels, guide_labels = flow_for_cli.conditioning(seeds, "cpu")
        with torch_threads(1), torch.no_grad():
            return fastguide.sample(denoiser, fastguide.seeded_noise(seeds, (4, 8, 8)), labels=labels,
                                    guide_labels=guide_labels, guidance=4.0, sigmas=flow_sigmas(scheduler, 4),
                                    solver="euler")
    for seeds in ([0, 1], [2, 3], [4]):
        x = direct(seeds)
        for row, seed in enumerate(seeds):
            with np.load(files[seed]) as data:
                assert data["x"].shape == (4, 8, 8) and np.array_equal(data["x"], x[row].numpy())
    together = direct(list(range(5))).numpy()
    written = np.stack([np.load(path)["x"] for path in files])
    assert max_rel_err(written, together) < 1e-5
    assert max_rel_err(written[3], written[0]) > 1e-2  # seeds 0 and 3 share a prompt, not their noise
    settings = json.load(open(os.path.join(outdir, "manifest.json")))["settings"]
    assert settings["sigmas"] == flow_sigmas(scheduler, 4).tolist() and settings["sigmas"][0] == 1.0


def test_conditioning_failing_while_sampling_names_its_seeds(tmp_path, capsys):
    outdir = str(tmp_path / "failing")
    assert main(["sample", "--net", "nets_for_cli:failing_later_conditioning", "--seeds", "0-5", "--batch", "2",
                 "--steps", "2", "--format", "npz", "--outdir", outdir]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("fastguide sample: error: seeds 4-5 were not written: --net: "
                           "nets_for_cli:failing_later_conditioning's conditioning(4-5) raised KeyError")
    assert [os.path.basename(p) for p in result_files(outdir)] == [f"{s:06d}.npz" for s in range(4)]


# ---------------------------------------------------------------- reruns: manifest, unreadable files

def copy_of(reference_run, tmp_path, name="copy"):
    outdir = str(tmp_path / name)
    shutil.copytree(reference_run, outdir)
    return outdir


def run_common(*options, outdir):
    with torch_threads(1):  # like each torchrun rank (OMP_NUM_THREADS=1)
        return main(["sample", *COMMON, *options, "--outdir", outdir])


@pytest.mark.parametrize("options, differing", [
    (["--steps", "5"], "--steps 4 there, 5 here"),
    (["--guidance", "3"], "--guidance 2.0 there, 3.0 here"),
    (["--solver", "euler"], "--solver 'heun' there, 'euler' here"),
    (["--guide", "nets_for_cli:tiny_guide", "--strategy", "separate"], "--guide None there, 'nets_for_cli:tiny_guide'"),
    (["--interval", "0.5", "10"], "--interval None there, [0.5, 10.0] here"),
    (["--shape", "3,4,4"], "--shape [3, 8, 8] there, [3, 4, 4] here"),
    (["--class", "1"], "--class None there, 1 here"),
    (["--sigma-max", "40"], "--sigma-max 80.0 there, 40.0 here"),
    (["--churn", "5"], "--churn 0.0 there, 5.0 here"),
    (["--churn", "5", "--s-max", "10"], "--s-max None there, 10.0 here"),
    (["--solver", "euler_ancestral", "--eta", "0.5"], "--eta 1.0 there, 0.5 here"),
    (["--rule", "cfg_rescale", "--rule-arg", "phi=0.5"],
     "--rule {'name': 'lerp'} there, {'name': 'cfg_rescale', 'phi': 0.5, 'space': 'eps'} here"),
])
def test_rerun_with_other_settings_is_refused_unless_forced(reference_run, tmp_path, capsys, options, differing):
    outdir = copy_of(reference_run, tmp_path)
    ids = file_ids(result_files(outdir))
    manifest = open(os.path.join(outdir, "manifest.json")).read()
    assert run_common(*options, outdir=outdir) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--outdir holds samples made with other settings" in err and differing in err
    assert "--force" in err
    assert file_ids(result_files(outdir)) == ids and len(records(outdir)) == 1  # nothing written
    assert open(os.path.join(outdir, "manifest.json")).read() == manifest
    assert run_common(*options, "--force", outdir=outdir) == 0  # the manifest is replaced
    if "--shape" in options:  # files of another shape are no results of this run: sampled again
        assert all(np.load(p)["x"].shape == (3, 4, 4) for p in result_files(outdir))
    else:  # existing files are kept
        assert file_ids(result_files(outdir)) == ids
    assert run_common(*options, outdir=outdir) == 0  # the new settings are the manifest's now


def test_batch_strategy_and_backend_are_not_settings(reference_run, tmp_path):
    """They change how the samples are computed, not which: a rerun with others resumes."""
    outdir = copy_of(reference_run, tmp_path)
    os.remove(os.path.join(outdir, "000000", "000005.npz"))
    assert run_common("--batch", "3", "--strategy", "separate", "--backend", "reference", outdir=outdir) == 0
    assert [os.path.basename(p) for p in result_files(outdir)] == [f"{s:06d}.npz" for s in SEEDS]
    with np.load(os.path.join(outdir, "000000", "000005.npz")) as new, \
            np.load(os.path.join(reference_run, "000000", "000005.npz")) as old:
        assert max_rel_err(new["x"], old["x"]) < 1e-5


def test_manifest_from_before_a_setting_existed_means_its_default(reference_run, tmp_path, capsys):
    """A manifest written before --churn, --rule, ... existed (without their keys) holds samples made with
    their defaults: a rerun with the defaults resumes, one with another value is refused."""
    outdir = copy_of(reference_run, tmp_path)
    path = os.path.join(outdir, "manifest.json")
    manifest = json.load(open(path))
    for key in ("rule", "eta", "churn", "s_min", "s_max", "s_noise", "sigmas"):
        del manifest["settings"][key]
    with open(path, "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(outdir, "000000", "000004.npz"))
    assert run_common(outdir=outdir) == 0
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run))
    assert run_common("--churn", "1", outdir=outdir) == 2
    assert "--churn 0.0 there, 1.0 here" in capsys.readouterr().err


def test_edm_defaults_come_from_the_plan(tmp_path, monkeypatch):
    """The CLI's defaults for --steps, --sigma-min, --sigma-max and --rho are fastguide.plan.EDM_DEFAULTS."""
    for key, value in dict(num_steps=3, sigma_min=0.01, sigma_max=40.0, rho=5.0).items():
        monkeypatch.setitem(fastguide.plan.EDM_DEFAULTS, key, value)
    outdir = str(tmp_path / "defaults")
    assert main(["sample", "--net", "nets_for_cli:tiny_net", "--seeds", "0-1", "--format", "npz",
                 "--outdir", outdir]) == 0
    settings = json.load(open(os.path.join(outdir, "manifest.json")))["settings"]
    assert [settings[key] for key in ("steps", "sigma_min", "sigma_max", "rho")] == [3, 0.01, 40.0, 5.0]
    assert records(outdir)[0]["counts"]["evaluations_per_sample"]["net"] == 5  # Heun: 2·3 − 1


@pytest.mark.parametrize("text", ['{"manifest": 1, "sett', '{"manifest": 1}', '{"settings": [4]}', '[]'])
def test_unreadable_manifest_is_refused_unless_forced(reference_run, tmp_path, capsys, text):
    outdir = copy_of(reference_run, tmp_path)
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        f.write(text)
    assert run_common(outdir=outdir) == 2
    assert "cannot read" in capsys.readouterr().err
    assert run_common("--force", outdir=outdir) == 0
    assert json.load(open(os.path.join(outdir, "manifest.json")))["settings"]["steps"] == 4


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def empty(path):
    open(path, "wb").close()


def garble_end(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-20] + b"\0" * 20)


@pytest.mark.parametrize("spoil", [truncate, empty, garble_end])
def test_unreadable_npz_is_sampled_again(reference_run, tmp_path, spoil):
    outdir = copy_of(reference_run, tmp_path)
    ids = file_ids(result_files(outdir))
    spoiled = os.path.join(outdir, "000000", "000007.npz")
    spoil(spoiled)
    assert run_common(outdir=outdir) == 0
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run))
    assert {p: v for p, v in file_ids(result_files(outdir)).items() if p != spoiled} == \
        {p: v for p, v in ids.items() if p != spoiled}  # only the spoiled file was written
    assert records(outdir)[-1]["counts"]["written"] == 1


@pytest.mark.parametrize("spoil", [truncate, empty, garble_end])
def test_unreadable_png_is_sampled_again(tmp_path, spoil):
    outdir = str(tmp_path / "png")
    argv = ["sample", "--net", "nets_for_cli:tiny_net", "--seeds", "0-3", "--batch", "2", "--steps", "3",
            "--outdir", outdir]
    assert main(argv) == 0
    before = read_bytes(result_files(outdir, "png"))
    spoil(os.path.join(outdir, "000000", "000002.png"))
    assert main(argv) == 0
    assert read_bytes(result_files(outdir, "png")) == before
    assert records(outdir)[-1]["counts"]["written"] == 1


# ---------------------------------------------------------------- writing: atomic, concurrent, failing

def test_writers_of_one_path_never_share_a_temporary_file(tmp_path, monkeypatch):
    """A second writer of the same file finishes between the first one's write and rename."""
    path = str(tmp_path / "000000.npz")
    real_replace = os.replace

    def replace_after_another_writer(source, target):
        monkeypatch.setattr(os, "replace", real_replace)
        sample_cli.write_atomically(path, b"the other writer's")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    sample_cli.write_atomically(path, b"mine")
    assert open(path, "rb").read() == b"mine"
    assert os.listdir(tmp_path) == ["000000.npz"]


RACING_RUN = """
import os, sys, time
barrier, name = sys.argv[1], sys.argv[2]
real_replace = os.replace
def slow_replace(source, target):  # widens the window between writing a file and renaming it
    if target.endswith(".npz"):
        time.sleep(0.3)
    real_replace(source, target)
os.replace = slow_replace
from fastguide.cli import main
open(os.path.join(barrier, name), "w").close()
while len(os.listdir(barrier)) < 2:
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def test_two_processes_on_one_outdir(reference_run, tmp_path):
    """Two runs started together write the same files at the same time: both succeed, files whole."""
    outdir, barrier = str(tmp_path / "shared"), tmp_path / "barrier"
    barrier.mkdir()
    argv = ["sample", *COMMON, "--seeds", "0-5", "--outdir", outdir]
    processes = [subprocess.Popen([sys.executable, "-c", RACING_RUN, str(barrier), name, *argv],
                                  env=subprocess_env(), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [p.communicate(timeout=240)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run)[:6])
    assert not glob.glob(os.path.join(outdir, "*", ".*"))


def test_failed_write_leaves_no_partial_file_and_the_rerun_completes(reference_run, tmp_path, monkeypatch, capsys):
    """The rename of seed 5's file fails (say, the disk is full): the run stops naming it, every visible
    file is whole, no temporary file is left, and the rerun writes the rest."""
    outdir = str(tmp_path / "failing")
    real_replace = os.replace

    def failing_replace(source, target):
        if target.endswith("000005.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert run_common(outdir=outdir) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "seed 5: cannot write" in line and line.endswith("000005.npz: No space left on device")
    assert sorted(os.listdir(os.path.join(outdir, "000000"))) == [f"{s:06d}.npz" for s in range(5)]
    for path in result_files(outdir):
        with np.load(path) as data:
            assert data["x"].shape == (3, 8, 8)
    ids = file_ids(result_files(outdir))
    monkeypatch.setattr(os, "replace", real_replace)
    assert run_common(outdir=outdir) == 0
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run))
    assert {p: file_ids(result_files(outdir))[p] for p in ids} == ids
    assert not glob.glob(os.path.join(outdir, "*", ".*"))


def test_stale_temporary_files_are_removed_and_live_ones_kept(reference_run, tmp_path):
    outdir = copy_of(reference_run, tmp_path)
    folder = os.path.join(outdir, "000000")
    finished = subprocess.Popen(["true"])
    finished.wait()
    running = subprocess.Popen(["sleep", "60"])
    host = sample_cli.HOST
    try:
        names = dict(
            dead_writer=f".000003.npz~{host}~{finished.pid}~0a1b2c3d.tmp",
            live_writer=f".000004.npz~{host}~{running.pid}~0a1b2c3d.tmp",
            old_elsewhere=".000005.npz~other-host~123~0a1b2c3d.tmp",
            new_elsewhere=".000006.npz~other-host~123~0a1b2c3d.tmp",
            not_ours=".000007.npz.keep",
        )
        for name in names.values():
            open(os.path.join(folder, name), "wb").close()
        two_hours_ago = time.time() - 7200
        os.utime(os.path.join(folder, names["old_elsewhere"]), (two_hours_ago, two_hours_ago))
        assert run_common(outdir=outdir) == 0
        hidden = sorted(name for name in os.listdir(folder) if name.startswith("."))
        assert hidden == sorted([names["live_writer"], names["new_elsewhere"], names["not_ours"]])
    finally:
        running.kill()
        running.wait()


# ---------------------------------------------------------------- failures during sampling

def test_non_finite_batch_is_not_written_and_its_seeds_are_named(tmp_path, capsys):
    """The net gives NaN for the last batch only (of one seed): the other batches are written."""
    outdir = str(tmp_path / "nan")
    argv = ["sample", "--net", "nets_for_cli:lonely_nan_net", "--seeds", "0-4", "--batch", "2", "--steps", "3",
            "--format", "npz", "--outdir", outdir]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == ["fastguide sample: error: seeds 4 were not written: step 0 (euler evaluation at "
                                "sigma=80): net returned non-finite values (NaN or inf)"]
    assert [os.path.basename(p) for p in result_files(outdir)] == [f"{s:06d}.npz" for s in range(4)]
    (record,) = records(outdir)
    assert record["counts"]["written"] == 4 and record["counts"]["failed"] == 1


def test_non_finite_samples_are_not_written(tmp_path, capsys, monkeypatch):
    """Non-finite rows that the sampler returned (rather than raised for) are caught by the CLI itself."""
    real_sample = sample_cli.sample

    def first_row_nan(*args, **kwargs):
        x, stats = real_sample(*args, **kwargs)
        x[0] = float("nan")
        return x, stats

    monkeypatch.setattr(sample_cli, "sample", first_row_nan)
    outdir = str(tmp_path / "nan_rows")
    argv = ["sample", "--net", "nets_for_cli:tiny_net", "--seeds", "0-5", "--batch", "2", "--steps", "2",
            "--format", "npz", "--outdir", outdir]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == ["fastguide sample: error: seeds 0,2,4 were not written: the sample is not finite "
                                "(NaN or inf)"]
    assert [os.path.basename(p) for p in result_files(outdir)] == ["000001.npz", "000003.npz", "000005.npz"]


# ---------------------------------------------------------------- sharding across nodes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_shard_by_rank_not_local_rank(reference_run, tmp_path):
    """Two nodes of one process each: RANK 0 and 1, both LOCAL_RANK 0."""
    outdir = str(tmp_path / "nodes")
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, "-m", "fastguide", "sample", *COMMON, "--outdir", outdir],
                                  env=subprocess_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2",
                                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                  cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
    errors = [p.communicate(timeout=240)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert read_bytes(result_files(outdir)) == read_bytes(result_files(reference_run))
    (record,) = records(outdir)
    assert [r["written"] for r in sorted(record["ranks"], key=lambda r: r["rank"])] == [6, 6]
