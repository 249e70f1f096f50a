"""The evaluation's figures (matplotlib, headless): returned as Figures so that they can go both to
PNG files and to TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gao_figure(points: Sequence[Mapping[str, float]], reference: str = "SFT"):
    """Proxy and gold reward against √KL(policy‖reference) over RL checkpoints (Gao et al. 2022).

    points: {"step", "sqrt_kl", "proxy", "gold"} per checkpoint, in step order. Two y axes (the
    proxy is a normalised reward-model score, the gold a judge's score on its own scale); each point
    is labelled with its step, so a gold curve that bends down while the proxy rises reads at once.
    """
    x = np.array([p["sqrt_kl"] for p in points])
    fig, proxy_ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    gold_ax = proxy_ax.twinx()
    proxy_ax.plot(x, [p["proxy"] for p in points], "o-", color="tab:blue", label="proxy (reward model)")
    gold_ax.plot(x, [p["gold"] for p in points], "s--", color="tab:orange", label="gold (judge)")
    for p in points:
        proxy_ax.annotate(str(p["step"]), (p["sqrt_kl"], p["proxy"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    proxy_ax.set_xlabel(f"√KL(policy ‖ {reference}) [√nats per sequence]")
    proxy_ax.set_ylabel("proxy reward (normalised)", color="tab:blue")
    gold_ax.set_ylabel("gold reward", color="tab:orange")
    proxy_ax.set_title("Reward over-optimisation: proxy vs gold over RL checkpoints")
    handles = proxy_ax.get_legend_handles_labels()[0] + gold_ax.get_legend_handles_labels()[0]
    proxy_ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    proxy_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def policies_figure(metrics: Mapping[str, Mapping[str, float]], names: Sequence[str]):
    """One bar panel per metric name (e.g. gold, proxy, perplexity), one bar per policy."""
    policies = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [metrics[p].get(name, np.nan) for p in policies]
        ax.bar(policies, [np.nan if v is None else v for v in values], color="tab:gray")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    """Write `fig` as a PNG and release it."""
    fig.savefig(path)
    plt.close(fig)
