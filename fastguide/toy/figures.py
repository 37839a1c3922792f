"""The figures of the toy experiment in the paper's layout (matplotlib, PNG; no pyplot, so no display
is needed).  Views and the noise level of Figure 2 are EDM2's toy example's.

figure1: one panel per sample set (ground truth, no guidance, CFG, autoguidance) over the class
regions — class A orange, the union of A and B grey — each with an inset of Figure 2's window.
figure2: a zoom on a few branches at σ = 0.03: the trajectories without guidance, the densities p1
of the main model and p0 of the guide (with their scores at the start points), their ratio
p1/p0 (with its score ∇log p1 − ∇log p0), and the guided score field ∇log p0 + w·∇log(p1/p0)
with the trajectories it drives.
"""
import math

import torch
from matplotlib.figure import Figure

from fastguide import reference

FIGURE1_VIEW = (0.30, 0.30, 1.2)           # centre x, centre y, half-width (EDM2's Figure 1 view)
FIGURE2_VIEW = (0.45, 1.22, 0.3)           # EDM2's zoom: a few branches of class A
FIGURE2_SIGMA = 0.03                       # the noise level of Figure 2 (EDM2's)
REGION_DEPTH = 4.5                         # a class's region: log p within this many nats of its maximum
# Figure 2's shading depths below the maximum, in nats (EDM2's): the models' densities, their ratio, and
# the outline of the ground truth noised to σ.
MODEL_DEPTH, RATIO_DEPTH, NOISED_OUTLINE_DEPTH = 6.25, 4.84, 2.0
INSET_BOUNDS = (0.60, 0.02, 0.38, 0.38)    # the inset's place in a panel (axes fraction), bottom right
CLASS_COLOURS = {"AB": "#e6e6e6", "A": "#ffcc99"}
ARROW_LENGTH = 0.002                       # data units per unit of score (EDM2's arrows)


def view_extent(view):
    """(x_lo, x_hi, y_lo, y_hi) of a (centre x, centre y, half-width) view."""
    x, y, half = view
    return x - half, x + half, y - half, y + half


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


def _on_grid(logp_fn, points, resolution):
    """A log-density evaluated on grid points (in float32, ample for a picture) as [R, R] float64."""
    with torch.no_grad():
        return logp_fn(points.float()).double().reshape(resolution, resolution)


def _frame(ax, extent, title=None):
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def _regions(ax, xs, ys, class_logps):
    """Fills each class's region (log p within REGION_DEPTH of its maximum) and outlines it."""
    for name, logp in class_logps.items():
        level = float(logp.max()) - REGION_DEPTH
        ax.contourf(xs.numpy(), ys.numpy(), logp.numpy(), levels=[level, float("inf")], colors=[CLASS_COLOURS[name]])
        ax.contour(xs.numpy(), ys.numpy(), logp.numpy(), levels=[level], colors="0.55", linewidths=0.6)


def _shade(ax, xs, ys, logp, cmap, depth=8.0):
    """Shades a log-density from its maximum down to depth nats below it."""
    top = float(logp.max())
    ax.imshow(logp.clamp_min(top - depth).numpy(), origin="lower", cmap=cmap, vmin=top - depth, vmax=top,
              extent=(float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1])), interpolation="bilinear")


def _dots(ax, points, size, alpha):
    points = points.detach().cpu().float()
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=size, c="k", alpha=alpha, linewidths=0, rasterized=True)


def figure1(path, ground_truth_by_class, panels, *, view=FIGURE1_VIEW, zoom=FIGURE2_VIEW, resolution=300):
    """Writes Figure 1 to path.

    ground_truth_by_class: {"AB": mixture, "A": mixture} (anything with logp(x)); panels:
    [(title, samples [N, 2]), ...], drawn over the class regions with an inset of the zoom view."""
    extent, zoom_extent = view_extent(view), view_extent(zoom)
    xs, ys, points = grid(extent, resolution)
    zoom_xs, zoom_ys, zoom_points = grid(zoom_extent, resolution // 2)
    logps = {name: _on_grid(truth.logp, points, resolution) for name, truth in ground_truth_by_class.items()}
    zoom_logps = {name: _on_grid(truth.logp, zoom_points, resolution // 2)
                  for name, truth in ground_truth_by_class.items()}
    fig = Figure(figsize=(3.6 * len(panels), 3.9), dpi=150, layout="constrained")
    for ax, (title, samples) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _regions(ax, xs, ys, logps)
        _dots(ax, samples, size=0.5, alpha=0.35)
        _frame(ax, extent, title)
        inset = ax.inset_axes(INSET_BOUNDS)
        _regions(inset, zoom_xs, zoom_ys, zoom_logps)
        _dots(inset, samples, size=2.0, alpha=0.6)
        _frame(inset, zoom_extent)
        ax.indicate_inset_zoom(inset, edgecolor="0.2", alpha=0.8)
    fig.savefig(path)
    return path


def model_log_densities(main, guide, sigma, points):
    """(log p1, log p0): the main model's and the guide's unnormalised log-densities on points, at σ."""
    x = points.to(torch.float32)
    with torch.no_grad():
        return main.logp(x, sigma).double(), guide.logp(x, sigma).double()


def scores(main, guide, guidance, sigma, points):
    """{"main": ∇log p1, "guide": ∇log p0, "ratio": ∇log(p1/p0), "guided": ∇log p0 + w·∇log(p1/p0)} at points."""
    x = points.to(torch.float32)
    main_score, guide_score = main.score(x, sigma).double(), guide.score(x, sigma).double()
    return {"main": main_score, "guide": guide_score, "ratio": main_score - guide_score,
            "guided": reference.guide(main_score, guide_score, guidance)}


def figure2(path, main, guide, ground_truth, *, guidance, starts, trajectories, sigma=FIGURE2_SIGMA,
            view=FIGURE2_VIEW, resolution=200, title=None):
    """Writes Figure 2 to path: five panels over the zoom view at noise level σ.

    starts [M, 2]: the runs' start points (ground-truth samples noised to σ); trajectories:
    {"none": [S+1, M, 2], "guided": [S+1, M, 2]} the runs without and with guidance from them."""
    extent = view_extent(view)
    xs, ys, points = grid(extent, resolution)
    truth = _on_grid(ground_truth.logp, points, resolution)
    truth_noised = _on_grid(lambda x: ground_truth.logp(x, sigma), points, resolution)
    log_p1, log_p0 = (normalized_log_density(v.reshape(resolution, resolution), xs, ys)
                      for v in model_log_densities(main, guide, sigma, points))
    at_starts = scores(main, guide, guidance, sigma, starts)
    fig = Figure(figsize=(18.0, 4.0), dpi=120, layout="constrained")
    axes = fig.subplots(1, 5)
    if title:
        fig.suptitle(title, fontsize=12)
    _trajectory_panel(axes[0], xs, ys, truth, trajectories["none"], "trajectories without guidance")
    for ax, logp, cmap, key, name in ((axes[1], log_p1, "Greens", "main", r"main model $p_1$"),
                                      (axes[2], log_p0, "Reds", "guide", r"guiding model $p_0$"),
                                      (axes[3], log_p1 - log_p0, "Blues", "ratio", r"ratio $p_1 / p_0$")):
        _shade(ax, xs, ys, logp, cmap, depth=RATIO_DEPTH if key == "ratio" else MODEL_DEPTH)
        _outline(ax, xs, ys, truth_noised)
        _arrows(ax, starts, at_starts[key])
        _frame(ax, extent, rf"{name} at $\sigma$ = {sigma:g}")
    _trajectory_panel(axes[4], xs, ys, truth, trajectories["guided"],
                      rf"guided score ($w$ = {guidance:g}) and trajectories")
    _arrows(axes[4], starts, at_starts["guided"])
    fig.savefig(path)
    return path


def _outline(ax, xs, ys, logp):
    level = float(logp.max()) - NOISED_OUTLINE_DEPTH
    ax.contour(xs.numpy(), ys.numpy(), logp.numpy(), levels=[level], colors="C1", linewidths=0.8, alpha=0.8)


def _arrows(ax, at, vectors):
    at, vectors = at.detach().cpu().double(), vectors.detach().cpu().double() * ARROW_LENGTH
    ax.quiver(at[:, 0].numpy(), at[:, 1].numpy(), vectors[:, 0].numpy(), vectors[:, 1].numpy(), angles="xy",
              scale_units="xy", scale=1.0, width=4e-3, color="k", alpha=0.8)


def _trajectory_panel(ax, xs, ys, truth, trajectory, title):
    _shade(ax, xs, ys, truth, "Oranges", depth=REGION_DEPTH * 2)
    paths = trajectory.detach().cpu().double()
    for m in range(paths.shape[1]):
        ax.plot(paths[:, m, 0].numpy(), paths[:, m, 1].numpy(), "-", color="k", alpha=0.3, linewidth=0.8)
    ax.plot(paths[-1, :, 0].numpy(), paths[-1, :, 1].numpy(), ".", color="k", markersize=4)
    _frame(ax, (float(xs[0]), float(xs[-1]), float(ys[0]), float(ys[-1])), title)
