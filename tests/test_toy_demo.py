"""`fastguide demo` end to end on a reduced size, and the pieces that turn metrics into a verdict."""
import contextlib
import io
import json
import math
import os
import re
import time

import pytest

from fastguide._threads import torch_threads
from fastguide.toy import demo

ENTRY_KEYS = {"guidance", "precision", "recall", "outliers", "loglik_median"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_entry(entry, guidance):
    assert set(entry) == ENTRY_KEYS
    assert entry["guidance"] == guidance
    for key in ("precision", "recall", "outliers"):
        assert 0.0 <= entry[key] <= 1.0, (key, entry)
    assert math.isfinite(entry["loglik_median"])


def check_png(path, min_aspect):
    from matplotlib.image import imread
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > min_aspect * image.shape[0]
    assert float(image[..., :3].std()) > 0.05           # a drawing, not a blank canvas


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`fastguide demo` on a reduced size: 2048 points, EDM2's 32 Heun steps, budgets 8 and 64."""
    from fastguide.cli import main
    out = tmp_path_factory.mktemp("demo") / "demo out" / "nested"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture), torch_threads(1):      # one thread: fastest on a busy machine
        assert main(["demo", "--out", str(out), "--points", "2048", "--budgets", "8", "64", "--seed", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    quality = json.loads((out / "quality.json").read_text())
    return out, capture.getvalue(), metrics, quality


def test_demo_writes_valid_files(demo_run):
    out, printed, metrics, quality = demo_run
    assert set(metrics) == {"none", "cfg", "autoguidance", "sweep", "exact"}
    for method, weight in demo.HEADLINE.items():
        check_entry(metrics[method], weight)
    check_entry(metrics["exact"], 1.0)
    assert set(metrics["sweep"]) == {"cfg", "autoguidance"}
    for method in ("cfg", "autoguidance"):
        assert len(metrics["sweep"][method]) == len(demo.SWEEP)
        for entry, weight in zip(metrics["sweep"][method], demo.SWEEP):
            check_entry(entry, weight)
    # The headline runs are the sweep's runs at the same weight (the same start, the same samples).
    assert metrics["cfg"] == metrics["sweep"]["cfg"][demo.SWEEP.index(demo.HEADLINE["cfg"])]
    check_png(out / "figure1.png", min_aspect=3.0)        # four panels side by side
    check_png(out / "figure2.png", min_aspect=3.0)        # five panels side by side
    assert demo.format_table(metrics) in printed
    assert demo.claim_line(metrics) in printed
    assert demo.format_quality_table(quality) in printed


def test_demo_exact_row_is_near_perfect(demo_run):
    """The ground truth's own score, sampled by the same sampler from the same start, reproduces the
    ground truth: ~1 % outliers (the threshold's own rate), precision and recall of exact draws."""
    exact = demo_run[2]["exact"]
    assert exact["outliers"] < 0.025
    assert exact["precision"] > 0.93 and exact["recall"] > 0.93


def test_demo_reproduces_the_papers_claim(demo_run):
    """On the paper's setting: without guidance the model covers the tree but throws outliers; CFG
    (w = 4) loses recall; autoguidance (w = 3) throws fewer outliers than no guidance, keeps more
    recall than CFG and is more precise than no guidance."""
    metrics = demo_run[2]
    none, cfg, auto, exact = (metrics[key] for key in ("none", "cfg", "autoguidance", "exact"))
    assert none["recall"] > 0.9 and none["outliers"] > 2 * exact["outliers"]
    assert cfg["recall"] < none["recall"] - 0.3
    assert auto["outliers"] < none["outliers"] and auto["recall"] > cfg["recall"] + 0.2
    assert auto["precision"] > none["precision"]
    for method in ("cfg", "autoguidance"):                 # stronger guidance, less recall
        recalls = [entry["recall"] for entry in metrics["sweep"][method]]
        assert recalls == sorted(recalls, reverse=True), (method, recalls)


def test_demo_quality_table(demo_run):
    """Every solver × budget × interval run, each within its budget; Heun at 64 evaluations without
    the interval is the main table's autoguidance run (32 steps, the same start); 8 evaluations buy
    less than 64."""
    metrics, quality = demo_run[2], demo_run[3]
    assert quality["method"] == "autoguidance" and quality["guidance"] == demo.QUALITY_GUIDANCE
    assert quality["guidance_interval"] == list(demo.GUIDANCE_INTERVAL) and quality["points"] == 2048
    runs = {(run["solver"], run["budget"], run["interval"]): run for run in quality["runs"]}
    assert set(runs) == set(demo.planned_quality_runs((8, 64)))
    for (solver, budget, _), run in runs.items():
        assert 0 < run["evaluations"] <= budget and 0 <= run["outliers"] <= 1 and 0 <= run["recall"] <= 1
    assert [runs[solver, 64, False]["evaluations"] for solver in demo.QUALITY_SOLVERS] == [64, 63, 64]
    headline = metrics["autoguidance"]
    assert runs["heun", 64, False]["outliers"] == headline["outliers"]
    assert runs["heun", 64, False]["recall"] == headline["recall"]
    for solver in demo.QUALITY_SOLVERS:
        assert runs[solver, 8, False]["outliers"] > runs[solver, 64, False]["outliers"], solver
    assert runs["heun", 8, False]["outliers"] > 0.5       # 4 Heun steps from σ = 5 do not converge


@pytest.mark.usefixtures("one_thread")
def test_evaluate_is_deterministic():
    first, quality, samples = demo.evaluate(points=128, steps=4, budgets=(4,), seed=5)
    second, quality_again, _ = demo.evaluate(points=128, steps=4, budgets=(4,), seed=5)
    assert first == second and quality == quality_again
    assert set(samples) == set(demo.planned_runs())
    assert len(samples) == 1 + 2 * len(demo.SWEEP)          # headline runs are reused, not re-sampled
    assert all(tuple(x.shape) == (128, 2) for x in samples.values())


def fake_metrics(cfg, auto):
    """A metrics dict whose sweep holds (outliers, recall) pairs for CFG and autoguidance."""
    def entries(pairs):
        return [dict(guidance=w, precision=0.9, recall=recall, outliers=outliers, loglik_median=1.0)
                for w, (outliers, recall) in zip(demo.SWEEP, pairs)]
    sweep = {"cfg": entries(cfg), "autoguidance": entries(auto)}
    return dict(none=sweep["cfg"][0], cfg=sweep["cfg"][-1], autoguidance=sweep["autoguidance"][3], sweep=sweep)


def test_claim_is_computed_from_the_sweep():
    cfg = [(0.05, 0.8), (0.04, 0.7), (0.03, 0.6), (0.02, 0.5), (0.01, 0.4)]
    auto = [(0.04, 0.9), (0.03, 0.85), (0.02, 0.8), (0.015, 0.75), (0.005, 0.7)]
    held = fake_metrics(cfg, auto)
    # Ties (auto 2.5 vs CFG 3 outliers, auto 4 vs CFG 2 recall) do not count as better.
    assert demo.dominating_weights(held) == {1.5: [1.5, 2.0], 2.0: [2.0, 2.5, 3.0], 2.5: [2.5, 3.0, 4.0],
                                             3.0: [3.0, 4.0], 4.0: [4.0]}
    assert "HELD" in demo.claim_line(held)
    # CFG at w = 4 has fewer outliers than any autoguidance run: the claim fails there, and only there.
    failed = fake_metrics(cfg[:4] + [(0.001, 0.4)], auto)
    assert demo.dominating_weights(failed)[4.0] == []
    assert demo.claim_line(failed).endswith("CFG at w = 4")
    # Equal values do not count as fewer outliers or higher recall.
    tied = fake_metrics([(0.02, 0.9)] * 5, [(0.02, 0.95)] * 5)
    assert all(not autos for autos in demo.dominating_weights(tied).values())


def test_table_lists_every_run():
    table = demo.format_table(fake_metrics([(0.05, 0.8)] * 5, [(0.0123, 0.9)] * 5)).splitlines()
    assert len(table) == 2 + 3 + 2 * len(demo.SWEEP)
    assert table[-1] == "| sweep | autoguidance | 4 | 0.9000 | 0.9000 | 1.23 | 1.000 |"


@pytest.mark.parametrize("arguments, message", [
    (["--points", "10"], "--points must be >= 64"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--budgets", "8", "0"], "--budgets must be integers >= 1"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, arguments, message):
    from fastguide.cli import main
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--out", str(out), *arguments])
    assert not out.exists()


def test_unwritable_out_is_refused(tmp_path):
    from fastguide.cli import main
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot create --out directory"):
        main(["demo", "--out", str(blocker / "sub"), "--points", "64"])


def read_only_directories(tmp_path):
    """Existing directories this process cannot create files in: a chmod 555 one (unless we are root,
    whom permissions do not stop) and /sys/kernel (sysfs: not even root may create files there)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    candidates = [locked, "/sys/kernel"]
    found = []
    for path in candidates:
        try:
            with open(os.path.join(path, ".probe"), "w"):
                pass
            os.remove(os.path.join(path, ".probe"))
        except OSError:
            found.append(str(path))
    return found


def test_read_only_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """An existing, read-only --out directory: a clear error at once, not after the sampling."""
    from fastguide.cli import main
    directories = read_only_directories(tmp_path)
    if not directories:
        pytest.skip("no read-only directory available")
    monkeypatch.setattr(demo, "evaluate", lambda **kwargs: pytest.fail("the demo started working"))
    for directory in directories:
        started = time.perf_counter()
        with pytest.raises(SystemExit, match=re.escape(f"--out directory {directory} is not writable")):
            main(["demo", "--out", directory])
        assert time.perf_counter() - started < 5


def test_existing_output_that_cannot_be_rewritten_is_refused(tmp_path, monkeypatch):
    """An output name taken by a directory inside --out: refused before any work."""
    from fastguide.cli import main
    (tmp_path / "metrics.json").mkdir()
    monkeypatch.setattr(demo, "evaluate", lambda **kwargs: pytest.fail("the demo started working"))
    with pytest.raises(SystemExit, match="is not writable"):
        main(["demo", "--out", str(tmp_path)])


def test_grid_and_normalized_log_density():
    import torch

    from fastguide.toy import figures
    xs, ys, points = figures.grid((-1.0, 2.0, 0.0, 1.0), 7)
    assert points.shape == (49, 2)
    assert torch.equal(points[8], torch.tensor([xs[1], ys[1]], dtype=torch.float64))   # row 1, column 1
    logp = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    normalized = figures.normalized_log_density(logp, xs, ys)
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert abs(float(normalized.exp().sum()) * cell - 1.0) < 1e-12
    torch.testing.assert_close(normalized - logp, torch.full_like(logp, float(normalized[0, 0] - logp[0, 0])))


def test_non_finite_samples_name_the_run(monkeypatch):
    from fastguide.toy import fused
    real_sample_toy = fused.sample_toy

    def broken_sampler(main, guide, noise, *, guidance, **options):
        samples = real_sample_toy(main, guide, noise, guidance=guidance, **options)
        if guidance == 4.0:                      # cfg w=4 is the first run with this weight
            samples[7, 1] = float("nan")
        return samples

    monkeypatch.setattr(fused, "sample_toy", broken_sampler)
    with pytest.raises(RuntimeError, match=r"1 non-finite samples of 64 in run cfg w=4 \(backend 'auto'\)"):
        demo.evaluate(points=64, steps=2, seed=0)
