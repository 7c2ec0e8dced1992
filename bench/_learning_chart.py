"""The learning bench's chart: success and held-out MSE per method, averaged over clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (success_axis, mse_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, result in results.items():
        clients = list(result["clients"].values())
        rounds = [p["round"] for p in clients[0]["by_round"]]
        mse = np.mean([[p["mse"] for p in c["by_round"]] for c in clients], axis=0)
        mse_axis.plot(rounds, mse, marker="o", label=method)
        with_success = [i for i, p in enumerate(clients[0]["by_round"]) if p["success"]]
        rates = [
            np.mean([c["by_round"][i]["success"]["rate"] for c in clients]) for i in with_success
        ]
        success_axis.plot([rounds[i] for i in with_success], rates, marker="o", label=method)
    success_axis.set(title="closed-loop success (mean over clients)", xlabel="round", ylim=(0, 1))
    mse_axis.set(title="held-out MSE (standardized)", xlabel="round", yscale="log")
    success_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("chart: {}", json.dumps(str(path)))
