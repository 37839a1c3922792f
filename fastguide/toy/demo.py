"""`fastguide demo --out DIR`: the paper's 2D experiment, end to end, in under a minute.

Loads the shipped toy models, samples the same noise without guidance, with CFG and with
autoguidance (a sweep of guidance weights for both) using the fused sampler, scores every run
against exact ground-truth samples (fastguide.toy.metrics), and writes DIR/figure1.png,
DIR/figure2.png and DIR/metrics.json; then prints the table and whether the paper's claim held.
16384 points per run keeps the metrics' sampling error small (about 0.2 % on a 10 % outlier rate)
and the whole command near 30 s on a 2-core CPU (notes/toy_results.md).
"""
import json
import math
import time
from pathlib import Path

import torch

DEFAULT_POINTS = 16384
SWEEP = (1.5, 2.0, 2.5, 3.0, 4.0)
HEADLINE = {"none": 1.0, "cfg": 4.0, "autoguidance": 3.0}      # the paper's Figure 1 weights
GUIDES = {"none": None, "cfg": "guide_cfg", "autoguidance": "guide_auto"}
BACKENDS = ("auto", "cpp", "triton", "reference")
MIN_POINTS = 64


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for figure1.png, figure2.png and metrics.json")
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS,
                        help=f"samples per run and ground-truth points (default {DEFAULT_POINTS})")
    parser.add_argument("--steps", type=int, default=32, help="Heun steps per run (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the ground-truth draws")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="sampler backend (default auto: the fastest available)")


def run(args):
    out = _prepare(args)
    started = time.perf_counter()
    metrics, samples = evaluate(points=args.points, steps=args.steps, seed=args.seed, backend=args.backend,
                                progress=True, figure_dir=out)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2, allow_nan=False) + "\n")
    print(format_table(metrics))
    print(claim_line(metrics))
    print(f"wrote {out / 'figure1.png'}, {out / 'figure2.png'}, {out / 'metrics.json'} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _prepare(args):
    """Checks the arguments and creates the output directory, before any work."""
    if args.points < MIN_POINTS:
        raise SystemExit(f"fastguide demo: --points must be >= {MIN_POINTS}, got {args.points}")
    if args.steps < 1:
        raise SystemExit(f"fastguide demo: --steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"fastguide demo: cannot create --out directory {out}: {exc}") from None
    return out


def planned_runs():
    """The distinct (method, guidance) runs: the headline three and the sweep of both guides."""
    runs = [(method, weight) for method, weight in HEADLINE.items()]
    runs += [(method, weight) for method in ("cfg", "autoguidance") for weight in SWEEP]
    return list(dict.fromkeys(runs))


def evaluate(*, points=DEFAULT_POINTS, steps=32, seed=0, backend="auto", progress=False, figure_dir=None):
    """Samples and scores every run; writes the figures into figure_dir when given.

    Returns (metrics in the metrics.json layout, {(method, guidance): samples})."""
    from tqdm.auto import tqdm

    from fastguide.toy import load_model, tree_mixture
    from fastguide.toy.metrics import GroundTruthMetrics

    models = {name: load_model(name) for name in ("main", "guide_auto", "guide_cfg")}
    truth = tree_mixture("A")
    noise = torch.randn(points, 2, generator=torch.Generator().manual_seed(seed))
    runs = planned_runs()
    with tqdm(total=len(runs) + 2 + (2 if figure_dir is not None else 0), desc="demo", unit="task",
              disable=not progress) as bar:
        bar.set_postfix_str("ground truth")
        scorer = GroundTruthMetrics(truth, points, seed=seed + 1)
        bar.update()
        samples, scores = {}, {}
        for method, guidance in runs:
            bar.set_postfix_str(f"{method} w={guidance:g}")
            samples[method, guidance] = sample_run(models, method, guidance, noise, steps, backend)
            scores[method, guidance] = dict(guidance=guidance, **scorer(samples[method, guidance]))
            bar.update()
        if figure_dir is not None:
            _write_figures(Path(figure_dir), truth, scorer.real, samples, models, bar)
        bar.set_postfix_str("done")
        bar.update()
    return assemble(scores), samples


def sample_run(models, method, guidance, noise, steps, backend):
    """One run of the fused toy sampler (on the GPU when there is one); finite CPU samples [N, 2]."""
    from fastguide.toy.fused import sample_toy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    main = models["main"].to(device)
    guide = None if GUIDES[method] is None else models[GUIDES[method]].to(device)
    samples = sample_toy(main, guide, noise.to(device), guidance=guidance, num_steps=steps, backend=backend)
    return _finite(samples.cpu(), f"{method} w={guidance:g} (backend {backend!r})")


def _finite(samples, run_name):
    bad = int((~torch.isfinite(samples)).any(1).sum())
    if bad:
        raise RuntimeError(f"the sampler returned {bad} non-finite samples of {len(samples)} in run {run_name}")
    return samples


def assemble(scores):
    """metrics.json's layout from {(method, guidance): scores}."""
    metrics = {method: scores[method, weight] for method, weight in HEADLINE.items()}
    metrics["sweep"] = {method: [scores[method, weight] for weight in SWEEP] for method in ("cfg", "autoguidance")}
    return metrics


def _write_figures(out, truth, real, samples, models, bar):
    from fastguide.toy import figures

    bar.set_postfix_str("figure 1")
    figures.figure1(out / "figure1.png", truth, [
        ("ground truth", real),
        ("no guidance", samples["none", HEADLINE["none"]]),
        (f"CFG  w = {HEADLINE['cfg']:g}", samples["cfg", HEADLINE["cfg"]]),
        (f"autoguidance  w = {HEADLINE['autoguidance']:g}", samples["autoguidance", HEADLINE["autoguidance"]]),
    ])
    bar.update()
    bar.set_postfix_str("figure 2")
    figures.figure2(out / "figure2.png", models["main"].cpu(), models["guide_auto"].cpu(), truth,
                    guidance=HEADLINE["autoguidance"],
                    title="autoguidance: main model p₁ (width 64) guided by a smaller, shorter-trained p₀ (width 32)")
    bar.update()


def dominating_weights(metrics):
    """For each CFG weight of the sweep: the autoguidance weights with fewer outliers and higher recall."""
    sweep = metrics["sweep"]
    return {cfg["guidance"]: [auto["guidance"] for auto in sweep["autoguidance"]
                              if auto["outliers"] < cfg["outliers"] and auto["recall"] > cfg["recall"]]
            for cfg in sweep["cfg"]}


def claim_line(metrics):
    """Whether the paper's claim held in this run, computed from the sweep."""
    dominating = dominating_weights(metrics)
    failed = [weight for weight, autos in dominating.items() if not autos]
    if not failed:
        pairs = ", ".join(f"CFG w={w:g}: auto w={'/'.join(f'{a:g}' for a in autos)}" for w, autos in dominating.items())
        return ("paper's claim HELD: for every CFG weight, some autoguidance weight has fewer outliers and higher "
                f"recall ({pairs})")
    return ("paper's claim did NOT hold: no autoguidance weight has both fewer outliers and higher recall than "
            f"CFG at w = {', '.join(f'{w:g}' for w in failed)}")


def format_table(metrics):
    """A markdown table of every run: method, w, precision, recall, outliers %, median log-likelihood."""
    lines = ["| run | method | w | precision | recall | outliers % | median log p |",
             "|---|---|---|---|---|---|---|"]
    rows = [("headline", method, metrics[method]) for method in HEADLINE]
    rows += [("sweep", method, entry) for method in ("cfg", "autoguidance") for entry in metrics["sweep"][method]]
    for run_kind, method, entry in rows:
        lines.append(f"| {run_kind} | {method} | {entry['guidance']:g} | {entry['precision']:.4f} | "
                     f"{entry['recall']:.4f} | {100 * entry['outliers']:.2f} | {entry['loglik_median']:.3f} |")
    return "\n".join(lines)


def _json_ready(value):
    """Floats that JSON can hold: a non-finite number (a −∞ median) becomes null."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
