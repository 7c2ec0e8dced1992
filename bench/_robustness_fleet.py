"""The honest side of ``zk0 bench robustness``: ten arms, their real training, their MSE.

Ten clients from the four ``CLIENT_VARIANTS``, cycled: client ``i`` is variant ``i % 4`` on
episodes ``[10·(i // 4), 10·(i // 4) + 10)`` of that variant's cached 40-episode recording
(``make_clients``: recorded once by the cached recorder, seeds 0-3). The recorder draws every
episode's scene from the variant's seeded sequence, so the blocks are disjoint scenes: three
arms share variant sim-00 and sim-01, two share sim-02 and sim-03, none shares an episode.
Within its block a client holds out every fifth episode (``split_episodes``: 8 train, 2 held
out). Re-recording ten variants with new seeds would cost ~20 minutes here for the same thing.

Honest training is the round worker's (``zk0.agent.round_tasks._train``): a fresh LoRA copy of the
base, the global adapter loaded, processors on the fleet's shared statistics, ``train_policy``
with the round's seed, ``freeze_lora_a`` in ffa. Results are cached by the sha256 of everything
that shapes them (starting adapter bytes, statistics bytes, client, round, seed, steps), so a
run whose attacker was refused reuses the baseline's updates bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from zk0.agent.decoded_frames import DecodedFrames
from zk0.agent.training import TrainConfig, evaluate_mse, open_dataset, split_episodes
from zk0.bench._learning_clients import Client, make_clients
from zk0.hub.aggregation import Arrays
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora, load_adapter_state
from zk0.shared.normalization import Stats, dumps, to_lerobot
from zk0.shared.policy_factory import make_processors
from zk0.shared.sim_variants import CLIENT_VARIANTS

#: Episodes of each variant's cached recording (the bench learning's, already on disk).
RECORDED_EPISODES = 40
#: Episodes per client: ``split_episodes(10)`` holds out episodes 4 and 9 of the block.
EPISODES_PER_CLIENT = 10


def fleet_clients(count: int, policy_config: Any) -> tuple[list[Client], dict[str, Any]]:
    """``count`` clients cycling the four variants on disjoint episode blocks, and the setup
    record that says where each comes from."""
    variants = list(CLIENT_VARIANTS)
    blocks = -(-count // len(variants))
    if blocks * EPISODES_PER_CLIENT > RECORDED_EPISODES:
        raise ValueError(f"{count} clients need more than {RECORDED_EPISODES} episodes a variant")
    recorded = {c.name: c for c in make_clients(CLIENT_VARIANTS, RECORDED_EPISODES, policy_config)}
    from zk0.agent.training import dataset_stats

    clients, setup = [], {}
    for i in range(count):
        variant, block = variants[i % len(variants)], i // len(variants)
        first = block * EPISODES_PER_CLIENT
        train, held = split_episodes(EPISODES_PER_CLIENT)
        train, held = [first + e for e in train], [first + e for e in held]
        source = recorded[variant]
        stats = dataset_stats(open_dataset(source.root, policy_config, train))
        name = f"arm-{i:02d}"
        clients.append(replace(source, name=name, train_episodes=train, held_out=held, stats=stats))
        setup[name] = {
            "variant": variant,
            "variant_seed": CLIENT_VARIANTS[variant]["seed"],
            "episodes": [first, first + EPISODES_PER_CLIENT - 1],
            "train_episodes": train,
            "held_out": held,
            "train_frames": stats["action"].count,
        }
    return clients, setup


def arrays_digest(arrays: Arrays) -> bytes:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.digest()


@dataclass(frozen=True)
class Training:
    local_steps: int
    batch_size: int
    lr: float
    seed: int


class Fleet:
    """Trains honest clients and measures adapters, both cached by content hash."""

    def __init__(self, base_policy: Any, lora: LoraSpec, training: Training) -> None:
        self.base = base_policy
        self.config = base_policy.config
        self.lora = lora
        self.training = training
        self._frames: dict[str, DecodedFrames] = {}
        self._held_out: dict[str, Any] = {}
        self._updates: dict[bytes, tuple[Arrays, int]] = {}
        self._mse: dict[bytes, float] = {}
        self.trainings = 0
        self.training_hits = 0
        self.measurements = 0

    def model(self, arrays: Arrays) -> Any:
        model = apply_lora(copy.deepcopy(self.base), self.lora)
        load_adapter_state(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return model

    def train(
        self, client: Client, start: Arrays, stats: Stats, server_round: int, freeze_a: bool
    ) -> tuple[Arrays, int]:
        """The client's reply to round ``server_round``: its adapter and example count."""
        t = self.training
        key = hashlib.sha256(
            arrays_digest(start)
            + dumps(stats)
            + repr((client.name, server_round, t, freeze_a)).encode()
        ).digest()
        if key in self._updates:
            self.training_hits += 1
            return self._updates[key]
        if client.name not in self._frames:
            self._frames[client.name] = DecodedFrames(
                client.root, self.config.chunk_size, client.train_episodes
            )
        data = self._frames[client.name]
        model = self.model(start)
        preprocessor, _ = make_processors(self.config, to_lerobot(stats))
        # LoRA dropout draws from torch's global generator: seeded from the key, a cached and a
        # recomputed update are the same update.
        torch.manual_seed(int.from_bytes(key[:8], "little") % 2**63)
        from zk0.agent.training import train_policy

        train_policy(
            model,
            preprocessor,
            data,
            TrainConfig(
                local_steps=t.local_steps,
                batch_size=t.batch_size,
                lr=t.lr,
                seed=t.seed * 100_003 + server_round,  # as the ClientApp seeds round r
                freeze_lora_a=freeze_a,
            ),
        )
        arrays = {k: v.numpy().copy() for k, v in adapter_state(model).items()}
        self.trainings += 1
        # The ClientApp reports len(dataset): the frames of its training episodes.
        self._updates[key] = (arrays, len(data))
        return self._updates[key]

    def mse(self, arrays: Arrays, stats: Stats, client: Client, frames: int) -> float:
        """Held-out action MSE in the client's standardized units, as ``bench._learning_clients
        .measure`` computes it (same frames, noise, scale), the dataset opened once."""
        key = hashlib.sha256(
            arrays_digest(arrays) + dumps(stats) + repr((client.name, frames)).encode()
        ).digest()
        if key in self._mse:
            return self._mse[key]
        if client.name not in self._held_out:
            self._held_out[client.name] = open_dataset(client.root, self.config, client.held_out)
        model = self.model(arrays)
        preprocessor, postprocessor = make_processors(self.config, to_lerobot(stats))
        value, _ = evaluate_mse(
            model,
            preprocessor,
            self._held_out[client.name],
            frames,
            self.training.seed,
            postprocessor=postprocessor,
            scale=client.action_std.clamp_min(1e-6),
        )
        self.measurements += 1
        self._mse[key] = value
        return value
