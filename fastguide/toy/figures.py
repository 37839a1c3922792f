"""The figures of the toy experiment (matplotlib, PNG; no pyplot, so no display is needed).

figure1: the paper's Figure 1 analogue: samples of the ground truth, no guidance, CFG and
autoguidance over the ground truth's density, each with a zoomed inset on a few branch tips.
figure2: the Figure 2 analogue at one or more noise levels σ: the densities p1 of the main
model and p0 of the guide, their ratio p1/p0, and the guided score field that moves samples.
"""
import math

import torch
from matplotlib.figure import Figure

from fastguide import reference

EXTENT = (-1.1, 1.45, -0.8, 1.55)          # x_lo, x_hi, y_lo, y_hi: class A of the tree, room for the inset
ZOOM = (0.9, 1.3, -0.1, 0.3)               # a group of branch tips (x_lo, x_hi, y_lo, y_hi)
INSET_BOUNDS = (0.02, 0.02, 0.38, 0.38)      # the inset's place in the panel (axes fraction), bottom left
SAMPLE_COLOUR = "#d95f02"
DENSITY_CMAP = "Greys"


def grid(extent, resolution):
    """(xs [R], ys [R], points [R*R, 2]) of a regular grid over extent, rows along y (float64)."""
    x_lo, x_hi, y_lo, y_hi = extent
    xs = torch.linspace(x_lo, x_hi, resolution, dtype=torch.float64)
    ys = torch.linspace(y_lo, y_hi, resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return xs, ys, torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def normalized_log_density(logp, xs, ys):
    """log p normalised to integrate to 1 over the grid (logp: [R, R] on the grid xs × ys)."""
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    return logp - torch.logsumexp(logp.flatten(), 0) - math.log(cell)


def _truth_logp(ground_truth, points, sigma=0.0):
    """The ground truth's log-density on grid points, in float32 (ample for a picture, and faster)."""
    return ground_truth.logp(points.float(), sigma).double()


def _shade_density(ax, xs, ys, logp, depth=10.0, cmap=DENSITY_CMAP, alpha=1.0):
    """Shades a log-density, from its maximum down to depth nats below it."""
    top = float(logp.max())
    return ax.imshow(logp.clamp_min(top - depth).numpy(), origin="lower", cmap=cmap, alpha=alpha,
                     extent=(float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1])),
                     vmin=top - depth, vmax=top, interpolation="bilinear")


def _scatter(ax, points, size, alpha):
    points = points.detach().cpu().float()
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=size, c=SAMPLE_COLOUR, alpha=alpha,
               linewidths=0, rasterized=True)


def _frame(ax, extent):
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def figure1(path, ground_truth, panels, *, extent=EXTENT, zoom=ZOOM, resolution=300):
    """Writes the Figure 1 analogue to path.

    ground_truth: has logp(x) (the shaded background); panels: [(title, points [N, 2]), ...].
    """
    xs, ys, points = grid(extent, resolution)
    background = normalized_log_density(_truth_logp(ground_truth, points).reshape(resolution, resolution), xs, ys)
    fig = Figure(figsize=(3.6 * len(panels), 3.9), dpi=150, layout="constrained")
    for ax, (title, samples) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _shade_density(ax, xs, ys, background, alpha=0.35)
        _scatter(ax, samples, size=0.6, alpha=0.5)
        _frame(ax, extent)
        ax.set_title(title, fontsize=11)
        inset = ax.inset_axes(INSET_BOUNDS)
        _shade_density(inset, xs, ys, background, alpha=0.35)
        _scatter(inset, samples, size=3.0, alpha=0.7)
        _frame(inset, zoom)
        ax.indicate_inset_zoom(inset, edgecolor="0.2", alpha=0.8)
    fig.savefig(path)
    return path


def model_log_densities(main, guide, sigma, points):
    """(log p1, log p0): the main model's and the guide's unnormalised log-densities on points, at σ."""
    x = points.to(torch.float32)
    with torch.no_grad():
        return main.logp(x, sigma).double(), guide.logp(x, sigma).double()


def guided_score(main, guide, guidance, sigma, points):
    """∇log p0 + w·(∇log p1 − ∇log p0) on points at σ: (D_w(x) − x)/σ², the direction guidance moves x."""
    x = points.to(torch.float32)
    score1, score0 = main.score(x, sigma).double(), guide.score(x, sigma).double()
    return reference.guide(score1, score0, guidance)


def figure2(path, main, guide, ground_truth, *, guidance, sigmas=(0.05, 0.15), extent=EXTENT,
            resolution=100, arrows=30, title=None):
    """Writes the Figure 2 analogue to path: one row per σ in sigmas.

    Columns: log p1 (main model), log p0 (guide), log(p1/p0), and the guided density
    p0·(p1/p0)^w with stream lines of its score ∇log p0 + w·∇log(p1/p0).  Densities are
    normalised over the plotted grid; the black line outlines the ground truth noised to σ.
    """
    xs, ys, points = grid(extent, resolution)
    fig = Figure(figsize=(14.4, 3.8 * len(sigmas)), dpi=120, layout="constrained")
    rows = fig.subplots(len(sigmas), 4, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=12)
    for axes, sigma in zip(rows, sigmas):
        log_p1, log_p0 = model_log_densities(main, guide, sigma, points)
        log_p1 = normalized_log_density(log_p1.reshape(resolution, resolution), xs, ys)
        log_p0 = normalized_log_density(log_p0.reshape(resolution, resolution), xs, ys)
        truth = normalized_log_density(_truth_logp(ground_truth, points, sigma).reshape(resolution, resolution), xs, ys)
        for ax, logp, title in ((axes[0], log_p1, r"main model $\log p_1$"), (axes[1], log_p0, r"guide $\log p_0$")):
            fig.colorbar(_shade_density(ax, xs, ys, logp, cmap="viridis"), ax=ax, shrink=0.8)
            ax.set_title(rf"{title}   ($\sigma$ = {sigma:g})", fontsize=10)
        _ratio_panel(fig, axes[2], xs, ys, log_p1 - log_p0, truth)
        _score_panel(fig, axes[3], main, guide, guidance, sigma, xs, ys, log_p1, log_p0, truth, extent, arrows)
        for ax in axes:
            _frame(ax, extent)
    fig.savefig(path)
    return path


def _ratio_panel(fig, ax, xs, ys, log_ratio, truth):
    """log(p1/p0), clipped symmetrically at what the data region holds, with the data's outline."""
    near_data = truth > truth.max() - 8
    limit = float(log_ratio[near_data].abs().quantile(0.98)) if bool(near_data.any()) else 1.0
    image = ax.imshow(log_ratio.clamp(-limit, limit).numpy(), origin="lower", cmap="RdBu_r",
                      vmin=-limit, vmax=limit, interpolation="bilinear",
                      extent=(float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1])))
    _outline(ax, xs, ys, truth)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(r"$\log(p_1 / p_0)$   (red: main more likely)", fontsize=10)


def _outline(ax, xs, ys, truth, depth=6.0):
    """The contour of the ground truth (noised to σ) depth nats below its maximum."""
    ax.contour(xs.numpy(), ys.numpy(), truth.numpy(), levels=[float(truth.max()) - depth],
               colors="k", linewidths=0.5, alpha=0.6)


def _score_panel(fig, ax, main, guide, guidance, sigma, xs, ys, log_p1, log_p0, truth, extent, arrows):
    """Stream lines of the guided score over the guided density p0·(p1/p0)^w, coloured by log10 |score|."""
    guided = normalized_log_density(reference.guide(log_p1, log_p0, guidance), xs, ys)
    _shade_density(ax, xs, ys, guided, depth=8.0, alpha=0.6)
    _outline(ax, xs, ys, truth)
    coarse_xs, coarse_ys, coarse = grid(extent, arrows)
    score = guided_score(main, guide, guidance, sigma, coarse).reshape(arrows, arrows, 2)
    magnitude = score.norm(dim=2).clamp_min(1e-12)
    lines = ax.streamplot(coarse_xs.numpy(), coarse_ys.numpy(), score[..., 0].numpy(), score[..., 1].numpy(),
                          color=magnitude.log10().numpy(), cmap="plasma", density=0.8, linewidth=0.7,
                          arrowsize=0.7)
    fig.colorbar(lines.lines, ax=ax, shrink=0.8, label=r"$\log_{10}$ |score|")
    ax.set_title(rf"guided $p_0\,(p_1/p_0)^{{{guidance:g}}}$ and its score", fontsize=10)
