"""Figures and an HTML report of a run directory (``otfml plot``, ``otfml report``).

Figures (PNG, in ``RUN_DIR/plots/``):

* ``calls.png`` -- reference calls so far against the step;
* ``uncertainty.png`` -- the largest calibrated force-error estimate of each step
  with the tolerance it was compared with, reference calls marked;
* ``energy_temperature.png`` -- energy, and temperature (MD) or fmax (optimization);
* from an ``otfml evaluate --output RUN_DIR`` result (``evaluation.npz``):
  ``parity.png`` (model against reference forces) and ``error_vs_uncertainty.png``
  (actual per-atom force error against the estimate, with the tolerance).

Stages of a multi-stage run are drawn one after the other, separated by lines.
matplotlib is needed (``pip install 'otfml[plot]'``).
"""

from __future__ import annotations

import html
import json
import logging
import os

import numpy as np

from .errors import ConfigError

__all__ = ["plot_run", "plot_evaluation", "write_report"]

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("plots need matplotlib: pip install 'otfml[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stages(run_dir: str) -> list[tuple[str, dict, dict]]:
    """(name, steps.csv columns, driver section) of each stage of the run, in order
    (from run.json)."""
    from .drivers import read_steps
    from .run import STATE, stage_dirs

    try:
        with open(os.path.join(run_dir, STATE)) as fh:
            cfg = json.load(fh)["config"]
    except (OSError, ValueError, KeyError):
        return []
    out = []
    for stage, d in zip(cfg["stages"], stage_dirs(cfg, run_dir)):
        path = os.path.join(d, "steps.csv")
        if os.path.isfile(path):
            out.append((stage["name"], read_steps(path), stage["driver"]))
    return out


def plot_run(run_dir: str) -> list[str]:
    """Write the run figures into ``run_dir/plots``; returns their paths.

    Raises
    ------
    ConfigError
        ``run_dir`` holds no ``steps.csv`` (not a run directory).
    """
    stages = [(n, c, d) for n, c, d in _stages(run_dir) if len(c.get("step", []))]
    if not stages:
        raise ConfigError(f"{run_dir!r} holds no run (run.json and steps.csv): give the "
                          "output.directory of an otfml run")
    plt = _pyplot()
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    # one global step axis over the stages
    offset, parts, drivers = 0, [], []
    for name, c, drv in stages:
        x = offset + np.arange(len(c["step"]))
        parts.append((name, x, c))
        drivers.append(drv)
        offset += len(c["step"])
    files = []

    def finish(fig, ax_list, name):
        for ax in ax_list:
            for _, x, _ in parts[1:]:
                ax.axvline(x[0], color="0.6", lw=0.8, ls=":")
        ax_list[-1].set_xlabel("step (all stages)" if len(parts) > 1 else "step")
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, x, c in parts:
        ax.plot(x, c["reference_calls"], label=name)
    ax.set_ylabel("reference calls so far")
    if len(parts) > 1:
        ax.legend(fontsize=8)
    finish(fig, [ax], "calls.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, x, c in parts:
        std = c["max_force_std_eV_A"]
        ref = np.isin(c["source"], ("reference", "updated_model"))  # labelled steps
        ax.semilogy(x, std, lw=0.7, label=f"{name}: largest estimate" if len(parts) > 1
                    else "largest force-error estimate")
        ax.plot(x, c["threshold_eV_A"], color="k", lw=1.0, ls="--")
        ax.plot(x[ref], np.where(np.isfinite(std[ref]), std[ref], np.nanmin(std)
                                 if np.any(np.isfinite(std)) else 1.0),
                "r.", ms=3)
    ax.plot([], [], "k--", label="tolerance")
    ax.plot([], [], "r.", label="reference call")
    ax.set_ylabel("force error estimate, eV/Å")
    ax.legend(fontsize=8)
    finish(fig, [ax], "uncertainty.png")

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    md = [bool(np.any(c["time_fs"] > 0)) for _, _, c in parts]
    ax_f = ax2.twinx() if any(md) and not all(md) else ax2
    for (_name, x, c), is_md, drv in zip(parts, md, drivers):
        ax1.plot(x, c["energy_eV"], lw=0.7)
        if is_md:
            ax2.plot(x, c["temperature_K"], lw=0.7)
            start, end = drv["temperature_K"], drv.get("temperature_end_K")
            if drv.get("ensemble") == "langevin":  # the thermostat's target
                frac = np.clip(c["step"] / max(drv["steps"], 1), 0.0, 1.0)
                target = start if end is None else start + (end - start) * frac
                ax2.plot(x, np.broadcast_to(target, x.shape), color="k", lw=1.0, ls="--")
        else:
            ax_f.semilogy(x, c["fmax_eV_A"], lw=0.7, color="C2")
    if any(md) and any(d.get("ensemble") == "langevin" for d in drivers):
        ax2.plot([], [], "k--", label="thermostat target")
        ax2.legend(fontsize=8)
    ax1.set_ylabel("energy, eV")
    if any(md):
        ax2.set_ylabel("temperature, K")
    if not all(md):
        ax_f.set_ylabel("fmax, eV/Å")
    finish(fig, [ax1, ax2], "energy_temperature.png")

    evaluation = os.path.join(run_dir, "evaluation.npz")
    if os.path.exists(evaluation):
        files += plot_evaluation(evaluation, out_dir)
    return files


def plot_evaluation(path: str, out_dir: str) -> list[str]:
    """Parity and error-vs-estimate figures from an ``evaluation.npz``; returns their paths."""
    plt = _pyplot()
    d = np.load(path)
    os.makedirs(out_dir, exist_ok=True)
    ref, pred = d["forces_reference"].ravel(), d["forces_model"].ravel()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(ref, pred, ".", ms=2, alpha=0.5)
    lim = [min(ref.min(), pred.min()), max(ref.max(), pred.max())]
    ax.plot(lim, lim, "k-", lw=0.8)
    ax.set_xlabel("reference force component, eV/Å")
    ax.set_ylabel("model force component, eV/Å")
    ax.set_title(f"MAE {np.mean(np.abs(pred - ref)):.3f} eV/Å", fontsize=9)
    fig.tight_layout()
    parity = os.path.join(out_dir, "parity.png")
    fig.savefig(parity, dpi=110)
    plt.close(fig)

    est, err = d["force_error_estimate"], d["force_error"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.loglog(est, err, ".", ms=2, alpha=0.5)
    lim = [max(min(est.min(), err.min()), 1e-4), max(est.max(), err.max())]
    ax.plot(lim, lim, "k-", lw=0.8, label="error = estimate")
    tol = float(d["force_tolerance"]) if "force_tolerance" in d else float("nan")
    if np.isfinite(tol):
        ax.axhline(tol, color="r", lw=0.8, ls="--", label=f"tolerance {tol:g} eV/Å")
        ax.axvline(tol, color="r", lw=0.8, ls="--")
    ax.set_xlabel("estimated per-atom force error, eV/Å")
    ax.set_ylabel("actual per-atom force error, eV/Å")
    ax.legend(fontsize=8)
    fig.tight_layout()
    evu = os.path.join(out_dir, "error_vs_uncertainty.png")
    fig.savefig(evu, dpi=110)
    plt.close(fig)
    return [parity, evu]


def _cell(v) -> str:
    """A value as a person reads it: numbers to 4 significant digits, mappings as
    ``key: value`` lines, lists comma-separated (HTML-escaped)."""
    if isinstance(v, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_cell(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _rows(d: dict) -> str:
    return "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"
                      for k, v in d.items())


def write_report(run_dir: str) -> str:
    """Write ``run_dir/report.html``: the summary table, stage tables and all figures; for a
    parallel run (``mpirun ... otfml run``), every walker's table and figures."""
    walkers_dir = os.path.join(run_dir, "walkers")
    if os.path.isdir(walkers_dir) and not os.path.exists(os.path.join(run_dir, "run.json")):
        figures = [f for w in sorted(os.listdir(walkers_dir))
                   for f in plot_run(os.path.join(walkers_dir, w))]
    else:
        figures = plot_run(run_dir)
    summary_path = os.path.join(run_dir, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as fh:
            summary = json.load(fh)
    stages = summary.pop("stages", [])
    walkers = summary.pop("walkers", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>otfml run report</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1.5em}th,td{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left;font-size:90%}img{max-width:100%}</style></head><body>",
        f"<h1>otfml run: {html.escape(os.path.abspath(run_dir))}</h1>",
    ]
    if not summary:
        parts.append("<p><b>No summary.json: the run has not finished.</b></p>")
    parts.append(f"<h2>Summary</h2><table>{_rows(summary)}</table>")
    for st in stages:
        parts.append(f"<h3>Stage {html.escape(str(st.get('stage')))}</h3>"
                     f"<table>{_rows(st)}</table>")
    for w, ws in walkers.items():
        parts.append(f"<h3>Walker {html.escape(str(w))}</h3><table>{_rows(ws)}</table>")
    evaluation = os.path.join(run_dir, "evaluation.json")
    model = os.path.join(run_dir, "model.npz")
    if os.path.exists(evaluation):
        with open(evaluation) as fh:
            parts.append(f"<h2>Evaluation</h2><table>{_rows(json.load(fh))}</table>")
        if os.path.exists(model) and os.path.getmtime(model) > os.path.getmtime(evaluation):
            parts.append("<p><b>This evaluation is of an older model than the run's "
                         "model.npz: run otfml evaluate again.</b></p>")
    parts.append("<h2>Figures</h2>")
    for f in figures:
        rel = os.path.relpath(f, run_dir)
        title = rel if walkers else os.path.basename(f)
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(rel)}'>")
    parts.append("</body></html>")
    path = os.path.join(run_dir, "report.html")
    with open(path, "w") as fh:
        fh.write("\n".join(parts))
    return path
