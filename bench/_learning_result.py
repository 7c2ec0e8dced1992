"""``zk0 bench learning``'s result: the summary keys the issue names, and a cut-short run's
methods to resume from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer

from zk0.shared.success import SuccessRate


def summarize(methods: dict[str, Any], default: str, base_task: SuccessRate) -> dict[str, Any]:
    """The summary keys the issue names, from the last point of each method per client
    (point estimates on the same paired scenes; a key is absent when a method did not run)."""

    def last(method: str, key: str) -> dict[str, float]:
        clients = methods.get(method, {}).get("clients", {})
        values = {}
        for name, points in clients.items():
            value = points[-1][key]
            values[name] = value["rate"] if key == "success" else value
        return values

    def mean(values: dict[str, float]) -> float:
        return float(np.mean(list(values.values())))

    summary: dict[str, Any] = {
        "default_mode": default,
        "base_task_success": base_task.rate,
        "base_task_episodes": base_task.episodes,
    }
    base_s, default_s, local_s = (last(m, "success") for m in ("base", default, "local_only"))
    base_m, default_m, local_m, central_m = (
        last(m, "mse") for m in ("base", default, "local_only", "centralized")
    )
    if base_s:
        summary["base_client_success_mean"] = mean(base_s)
    if base_s and default_s:
        summary["success_gain_pp_over_base"] = 100 * mean(
            {c: default_s[c] - base_s[c] for c in default_s}
        )
    if local_s and default_s:
        summary["default_minus_local_only_success_pp"] = 100 * mean(
            {c: default_s[c] - local_s[c] for c in default_s}
        )
    if base_m and default_m and central_m:
        gain = mean(base_m) - mean(central_m)
        summary["fraction_of_centralized_gain_mse"] = (
            (mean(base_m) - mean(default_m)) / gain if gain else None
        )
    if local_m and default_m:
        summary["worst_client_mse_over_local_only"] = max(
            default_m[c] / local_m[c] for c in local_m
        )
    return summary


#: The issue's bars on the summary keys: (key, "min" or "max", bound).
BARS: tuple[tuple[str, str, float], ...] = (
    ("base_task_success", "min", 0.6),
    ("base_client_success_mean", "max", 0.3),
    ("success_gain_pp_over_base", "min", 25.0),
    ("default_minus_local_only_success_pp", "min", 0.0),
    ("fraction_of_centralized_gain_mse", "min", 0.95),
    ("worst_client_mse_over_local_only", "max", 1.05),
)


def bars(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per bar: the bound, the value, whether it is met and, if not, by how much it is missed."""
    verdicts: dict[str, dict[str, Any]] = {}
    for key, kind, bound in BARS:
        value = summary.get(key)
        if value is None:
            continue
        met = value >= bound if kind == "min" else value <= bound
        verdicts[key] = {
            kind: bound,
            "value": value,
            "met": met,
            "missed_by": None if met else abs(value - bound),
        }
    return verdicts


def measured_before(
    path: Path, setup: dict[str, Any], wanted: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The wanted methods (and their real-time success) an earlier run wrote to ``path``.

    A run of hours can be finished in parts, but only on the same footing: the same clients,
    recorded episodes, evaluation scenes and run config, and the base scoring exactly what it
    scored then (closed loop in simulated time is deterministic given the seeds)."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(
            f"{path}: not a learning result ({exc})", param_hint="--resume"
        ) from None
    setup = json.loads(json.dumps(setup))  # compared as it is stored
    if before.get("setup") != setup:
        changed = sorted(k for k in setup if before.get("setup", {}).get(k) != setup[k])
        raise typer.BadParameter(
            f"{path} was measured on another setup ({', '.join(changed)} differ); "
            "run without --resume",
            param_hint="--resume",
        )
    methods = {m: r for m, r in before.get("methods", {}).items() if m in wanted}
    realtime = {m: r for m, r in before.get("realtime_async", {}).items() if m in methods}
    return methods, realtime
