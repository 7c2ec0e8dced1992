"""The evaluation record of a federated run: per-agent eval MSE and success by round, JSON + chart.

``eval_mse_history.json`` (the name predates success; kept so readers keep working) holds::

    rounds            [0, 1, ...]                    round 0 = the starting adapter
    clients           {agent: [mse | null, ...]}     held-out action MSE per round
    average           [mse | null, ...]              example-weighted over the agents
    success           {agent: [rate | null, ...]}    closed-loop success per round
    success_average   [rate | null, ...]             the fleet's, pooled (see below)
    success_asked     [episodes, ...]                episodes each round asked of each agent
    dropped           [{agent: reason}, ...]         training replies the round did not count
    skipped           [{agent: reason}, ...]         agents that declined it, their arm busy
    round_s           [seconds | null, ...]          training messages out -> evaluation done
    aggregation_s     [seconds | null, ...]          robust aggregation + server optimizer step
    aggregation       "fedavg" | "svd" | "ffa"

A rate is a ``zk0.shared.success.SuccessRate`` dump (successes, episodes, rate and its 95 %
Wilson interval low/high); null where it was not measured: no episode asked, a real arm (never
driven by a round), an agent absent or its counts refused. The fleet's rate pools successes and
episodes over the agents measured that round, so an agent that ran more episodes weighs more.
Round 0 trains nothing: no drops, no skips, null seconds; ``aggregation_s`` is null too in a
round that aggregated nothing. Files written before a field existed read with those defaults.
``eval_mse_chart.png`` draws MSE (left) and success with its interval (right) by round.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0.shared.success import SuccessRate

HISTORY_FILE = "eval_mse_history.json"
CHART_FILE = "eval_mse_chart.png"


@dataclass
class EvalHistory:
    aggregation: str
    rounds: list[int] = field(default_factory=list)
    clients: dict[str, list[float | None]] = field(default_factory=dict)
    average: list[float | None] = field(default_factory=list)
    success: dict[str, list[SuccessRate | None]] = field(default_factory=dict)
    success_average: list[SuccessRate | None] = field(default_factory=list)
    success_asked: list[int] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    round_s: list[float | None] = field(default_factory=list)
    aggregation_s: list[float | None] = field(default_factory=list)

    def add_round(
        self,
        server_round: int,
        mse: dict[str, float],
        examples: dict[str, int],
        success: dict[str, SuccessRate] | None = None,
        success_asked: int = 0,
        *,
        dropped: Mapping[str, str] | None = None,
        skipped: Mapping[str, str] | None = None,
        round_s: float | None = None,
        aggregation_s: float | None = None,
    ) -> None:
        """Record one round; agents absent from it (dropped, offline) get ``None`` there."""
        success = success or {}
        self.dropped.append(dict(sorted((dropped or {}).items())))
        self.skipped.append(dict(sorted((skipped or {}).items())))
        self.round_s.append(round_s)
        self.aggregation_s.append(aggregation_s)
        self.rounds.append(server_round)
        for agent in (*mse, *success):
            self.clients.setdefault(agent, [None] * (len(self.rounds) - 1))
        for agent, series in self.clients.items():
            series.append(mse.get(agent))
            self.success.setdefault(agent, [None] * (len(self.rounds) - 1)).append(
                success.get(agent)
            )
        total = sum(examples[agent] for agent in mse)
        self.average.append(sum(mse[a] * examples[a] for a in mse) / total if total else None)
        self.success_average.append(pooled(success.values()))
        self.success_asked.append(success_asked)

    @property
    def measured_success(self) -> bool:
        return any(rate is not None for rate in self.success_average)

    def as_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "clients": dict(sorted(self.clients.items())),
            "average": self.average,
            "success": {a: [_dump(r) for r in s] for a, s in sorted(self.success.items())},
            "success_average": [_dump(r) for r in self.success_average],
            "success_asked": self.success_asked,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "round_s": self.round_s,
            "aggregation_s": self.aggregation_s,
            "aggregation": self.aggregation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalHistory:
        """Read back ``as_dict`` (files written before success, drops, skips or seconds were
        recorded read too)."""
        rounds = [int(r) for r in data["rounds"]]
        empty: list[None] = [None] * len(rounds)
        clients = {a: list(s) for a, s in data["clients"].items()}
        return cls(
            aggregation=str(data.get("aggregation", "")),
            rounds=rounds,
            clients=clients,
            average=list(data["average"]),
            success={a: [_load(r) for r in data.get("success", {}).get(a, empty)] for a in clients},
            success_average=[_load(r) for r in data.get("success_average", empty)],
            success_asked=[int(n) for n in data.get("success_asked", [0] * len(rounds))],
            dropped=_reasons(data.get("dropped"), len(rounds)),
            skipped=_reasons(data.get("skipped"), len(rounds)),
            round_s=_seconds(data.get("round_s"), len(rounds)),
            aggregation_s=_seconds(data.get("aggregation_s"), len(rounds)),
        )

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

        figure, (mse_axes, success_axes) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
        # One colour per agent in both panels, whichever of them an agent appears in.
        colors = {agent: f"C{i % 10}" for i, agent in enumerate(sorted(self.clients))}
        self._mse_panel(mse_axes, colors)
        self._success_panel(success_axes, colors)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)

    def _mse_panel(self, axes: Any, colors: dict[str, str]) -> None:
        for agent, series in sorted(self.clients.items()):
            axes.plot(
                self.rounds,
                _nan_gaps(series),
                marker="o",
                linewidth=1.2,
                color=colors[agent],
                label=agent,
            )
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

    def _success_panel(self, axes: Any, colors: dict[str, str]) -> None:
        axes.set_xlabel("round (0 = starting adapter)")
        axes.set_ylabel("closed-loop success rate")
        axes.set_title("Success per agent (simulated time, 95 % Wilson interval)")
        axes.set_xticks(self.rounds)
        axes.set_ylim(-0.03, 1.03)
        axes.grid(alpha=0.3)
        if not self.measured_success:
            axes.text(
                0.5,
                0.5,
                "not measured\n(success-episodes 0, or no simulated agent)",
                ha="center",
                va="center",
                transform=axes.transAxes,
                color="gray",
            )
            return
        fleet_label = "fleet (pooled)"
        series = [*sorted(self.success.items()), (fleet_label, self.success_average)]
        # Agents share rounds and often rates: shift each a little so its bar stays visible.
        width = 0.3 / max(len(series), 1)
        for index, (label, rates) in enumerate(series):
            points = [
                (r, rate) for r, rate in zip(self.rounds, rates, strict=True) if rate is not None
            ]
            if not points:
                continue
            xs = [r + (index - (len(series) - 1) / 2) * width for r, _ in points]
            ys = [rate.rate or 0.0 for _, rate in points]
            below = [max(y - rate.low, 0.0) for y, (_, rate) in zip(ys, points, strict=True)]
            above = [max(rate.high - y, 0.0) for y, (_, rate) in zip(ys, points, strict=True)]
            fleet = label == fleet_label
            axes.errorbar(
                xs,
                ys,
                yerr=[below, above],
                marker="s" if fleet else "o",
                color="black" if fleet else colors[label],
                linewidth=2.2 if fleet else 1.0,
                linestyle="--" if fleet else "-",
                capsize=3,
                label=label,
            )
        axes.legend(fontsize=8)

    def summary_lines(self) -> list[str]:
        first, last = self.rounds[0], self.rounds[-1]
        success = self.measured_success
        head = f"{'agent':<16} {'round ' + str(first):>12} {'round ' + str(last):>12} {'change':>8}"
        if success:
            head += f"  {'success round ' + str(first):>22}  {'success round ' + str(last):>22}"
        lines = [head]
        rows = [
            *((a, s, self.success.get(a, [None])) for a, s in sorted(self.clients.items())),
            ("average", self.average, self.success_average),
        ]
        for agent, series, rates in rows:
            start, end = series[0], series[-1]
            change = f"{(end - start) / start:+.0%}" if start and end is not None else "n/a"
            line = f"{agent:<16} {_fmt(start):>12} {_fmt(end):>12} {change:>8}"
            if success:
                line += f"  {_describe(rates[0]):>22}  {_describe(rates[-1]):>22}"
            lines.append(line)
        return lines


def pooled(rates: Iterable[SuccessRate | None]) -> SuccessRate | None:
    """The fleet's rate: successes and episodes summed over the measured agents."""
    measured = [rate for rate in rates if rate is not None and rate.episodes]
    if not measured:
        return None
    return SuccessRate.of(sum(r.successes for r in measured), sum(r.episodes for r in measured))


def _dump(rate: SuccessRate | None) -> dict[str, Any] | None:
    return None if rate is None else rate.model_dump()


def _load(raw: dict[str, Any] | None) -> SuccessRate | None:
    return None if raw is None else SuccessRate.model_validate(raw)


def _reasons(raw: list[dict[str, Any]] | None, rounds: int) -> list[dict[str, str]]:
    if raw is None:
        return [{} for _ in range(rounds)]
    return [{str(agent): str(why) for agent, why in entry.items()} for entry in raw]


def _seconds(raw: list[float | None] | None, rounds: int) -> list[float | None]:
    return [None] * rounds if raw is None else [None if s is None else float(s) for s in raw]


def _nan_gaps(series: list[float | None]) -> list[float]:
    """Matplotlib leaves a gap at NaN: an agent absent from a round breaks its line there."""
    return [float("nan") if value is None else value for value in series]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def _describe(rate: SuccessRate | None) -> str:
    return "-" if rate is None else rate.describe()
