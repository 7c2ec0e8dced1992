"""The evaluation record of a federated run: per-agent eval MSE by round, JSON and chart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HISTORY_FILE = "eval_mse_history.json"
CHART_FILE = "eval_mse_chart.png"


@dataclass
class EvalHistory:
    aggregation: str
    rounds: list[int] = field(default_factory=list)
    clients: dict[str, list[float | None]] = field(default_factory=dict)
    average: list[float | None] = field(default_factory=list)

    def add_round(self, server_round: int, mse: dict[str, float], examples: dict[str, int]) -> None:
        """Record one round; agents absent from it (dropped, offline) get ``None`` there."""
        self.rounds.append(server_round)
        for agent in mse:
            self.clients.setdefault(agent, [None] * (len(self.rounds) - 1))
        for agent, series in self.clients.items():
            series.append(mse.get(agent))
        total = sum(examples[agent] for agent in mse)
        self.average.append(sum(mse[a] * examples[a] for a in mse) / total if total else None)

    def as_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "clients": dict(sorted(self.clients.items())),
            "average": self.average,
            "aggregation": self.aggregation,
        }

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``eval_mse_history.json`` and ``eval_mse_chart.png`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        history_path = folder / HISTORY_FILE
        history_path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        chart_path = folder / CHART_FILE
        self._chart(chart_path)
        return history_path, chart_path

    def _chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
        for agent, series in sorted(self.clients.items()):
            axes.plot(self.rounds, _nan_gaps(series), marker="o", linewidth=1.2, label=agent)
        axes.plot(
            self.rounds,
            _nan_gaps(self.average),
            color="black",
            linestyle="--",
            linewidth=2.2,
            marker="s",
            label="average (by examples)",
        )
        axes.set_xlabel("round (0 = starting adapter)")
        axes.set_ylabel("held-out action MSE (normalized)")
        axes.set_title(f"Eval MSE per agent ({self.aggregation})")
        axes.set_xticks(self.rounds)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)

    def summary_lines(self) -> list[str]:
        first, last = self.rounds[0], self.rounds[-1]
        lines = [
            f"{'agent':<16} {'round ' + str(first):>12} {'round ' + str(last):>12} {'change':>8}"
        ]
        rows = [*sorted(self.clients.items()), ("average", self.average)]
        for agent, series in rows:
            start, end = series[0], series[-1]
            change = f"{(end - start) / start:+.0%}" if start and end is not None else "n/a"
            lines.append(f"{agent:<16} {_fmt(start):>12} {_fmt(end):>12} {change:>8}")
        return lines


def _nan_gaps(series: list[float | None]) -> list[float]:
    """Matplotlib leaves a gap at NaN: an agent absent from a round breaks its line there."""
    return [float("nan") if value is None else value for value in series]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"
