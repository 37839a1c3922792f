"""`fastguide demo` end to end on a reduced size, and the pieces that turn metrics into a verdict."""
import json
import math

import pytest

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


def test_demo_end_to_end_writes_valid_files(tmp_path, capsys):
    from fastguide.cli import main
    out = tmp_path / "demo out" / "nested"
    assert main(["demo", "--out", str(out), "--points", "512", "--steps", "12", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"none", "cfg", "autoguidance", "sweep"}
    for method, weight in demo.HEADLINE.items():
        check_entry(metrics[method], weight)
    assert set(metrics["sweep"]) == {"cfg", "autoguidance"}
    for method in ("cfg", "autoguidance"):
        assert len(metrics["sweep"][method]) == len(demo.SWEEP)
        for entry, weight in zip(metrics["sweep"][method], demo.SWEEP):
            check_entry(entry, weight)
    # The headline runs are the sweep's runs at the same weight (the same noise, the same samples).
    assert metrics["cfg"] == metrics["sweep"]["cfg"][demo.SWEEP.index(demo.HEADLINE["cfg"])]
    # Trained models: without guidance the samples lie mostly on the tree and cover much of it.
    assert metrics["none"]["precision"] > 0.5 and metrics["none"]["recall"] > 0.5
    check_png(out / "figure1.png", min_aspect=3.0)        # four panels side by side
    check_png(out / "figure2.png", min_aspect=1.5)        # two rows of four panels
    assert demo.format_table(metrics) in printed
    assert demo.claim_line(metrics) in printed


def test_evaluate_is_deterministic():
    first, samples = demo.evaluate(points=128, steps=4, seed=5)
    second, _ = demo.evaluate(points=128, steps=4, seed=5)
    assert first == second
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
