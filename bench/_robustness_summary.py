"""The verdict of ``zk0 bench robustness``: top-level keys, bars and misses from the detail.

Pure: the per-fraction, per-mode, per-attack detail in, the summary out (so a result file's
summary can be recomputed from its detail).
"""

from __future__ import annotations

from typing import Any

#: Order-statistic modes (``order-statistic`` with fedavg); the 3-of-10 bar reads the best one.
ROBUST_MODES = ("fedavg+trimmed-mean", "fedavg+median")
CLIENTS = 10
#: Largest |relative MSE change| vs the honest-only baseline each bar allows.
BARS = {"1_of_10": 0.02, "3_of_10_robust": 0.10}


def relative(value: float, baseline: float) -> float:
    return (value - baseline) / baseline


def summarize(
    detail: dict[str, Any],
    modes: list[str],
    attacks: list[str],
    flower: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The top-level keys and bars from the per-fraction, per-mode, per-attack detail, and from
    the Flower runs (``_robustness_flower.flower_runs``) when there are any."""

    def changes(fraction: str, mode: str) -> dict[str, float]:
        runs = detail.get(fraction, {}).get(mode, {})
        return {a: runs["attacks"][a]["relative_mse_change"] for a in runs.get("attacks", {})}

    def worst(values: dict[str, float]) -> float | None:
        return max(values.values(), key=abs) if values else None

    one = {m: worst(changes("1_of_10", m)) for m in modes}
    one_all = [v for v in one.values() if v is not None]
    by_robust_mode = {m: worst(changes("3_of_10", m)) for m in modes if m in ROBUST_MODES}
    robust = {m: v for m, v in by_robust_mode.items() if v is not None}
    robust_mode = min(robust, key=lambda m: abs(robust[m])) if robust else None
    runs = [
        run
        for fraction in detail.values()
        for mode in fraction.values()
        for run in [mode["baseline"], *mode["attacks"].values()]
    ]
    flower = flower or {}
    runs += [run for entry in flower.values() for run in (entry["baseline"], entry["attacked"])]
    bad = sum(r["bad_versions_stored"] for r in runs)
    lost = sum(r["rounds_lost"] for r in runs)
    flower_changes = {f: entry["relative_mse_change"] for f, entry in flower.items()}
    worst_one = max(one_all, key=abs) if one_all else None
    worst_robust = robust[robust_mode] if robust_mode else None
    bars = {
        "1_of_10_within_2pct_every_attack_and_mode": worst_one is not None
        and abs(worst_one) <= BARS["1_of_10"],
        "3_of_10_within_10pct_in_robust_mode": worst_robust is not None
        and abs(worst_robust) <= BARS["3_of_10_robust"],
        "no_bad_versions_stored": bad == 0,
        "no_rounds_lost": lost == 0,
    }
    for fraction, change in flower_changes.items():
        bar = BARS["1_of_10" if fraction == "1_of_10" else "3_of_10_robust"]
        bars[f"flower_{fraction}_within_{bar * 100:.0f}pct"] = abs(change) <= bar
    table = {
        a: {
            m: {
                f: detail[f][m]["attacks"][a]["relative_mse_change"]
                for f in detail
                if a in detail[f].get(m, {}).get("attacks", {})
            }
            for m in modes
        }
        for a in attacks
    }
    return {
        "worst_relative_mse_change_1_of_10": worst_one,
        "worst_relative_mse_change_3_of_10_robust": worst_robust,
        "robust_mode": robust_mode,
        "bad_versions_stored": bad,
        "rounds_lost": lost,
        "bars": bars,
        "bars_met": all(bars.values()),
        "worst_1_of_10_by_mode": one,
        "worst_3_of_10_by_robust_mode": robust,
        "relative_mse_change_by_attack": table,
        "flower_relative_mse_change": flower_changes,
        "flower": flower,
        "misses": misses(detail, robust_mode),
    }


def misses(detail: dict[str, Any], robust_mode: str | None) -> list[dict[str, Any]]:
    """Every run past its bar, with what the product's screening did to each malicious agent
    per round (dropped, bounded, or counted as sent), so the cause can be read off."""
    found = []
    for fraction, modes in detail.items():
        bar = BARS["1_of_10"] if fraction.startswith("1_") else BARS["3_of_10_robust"]
        for mode, entry in modes.items():
            if not fraction.startswith("1_") and mode != robust_mode:
                continue
            for attack, run in entry["attacks"].items():
                if abs(run["relative_mse_change"]) <= bar:
                    continue
                # Arms are named arm-00 ... (fleet_clients); the malicious are those not measured.
                malicious = sorted(
                    {f"arm-{i:02d}" for i in range(CLIENTS)} - set(run["mse_per_client"])
                )
                outcome = [
                    {
                        agent: f"dropped: {r['dropped'][agent]}"
                        if agent in r["dropped"]
                        else f"bounded: {r['clipped'][agent]}"
                        if agent in r["clipped"]
                        else "counted as sent"
                        for agent in malicious
                    }
                    for r in run["rounds"]
                ]
                found.append(
                    {
                        "fraction": fraction,
                        "mode": mode,
                        "attack": attack,
                        "relative_mse_change": run["relative_mse_change"],
                        "bar": bar,
                        "malicious_per_round": outcome,
                        "stats": run["stats_notes"],
                    }
                )
    return found
