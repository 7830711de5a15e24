"""The demo's small real model: a logistic regression trained on a generated dataset.

Pure Python, deterministic, trained in well under a second. Its lineage is
real: the dataset digest is the SHA-256 of the CSV bytes it was trained on, the
artifact digest that of the serialised weights, the run records its params and
metrics, exactly what a CI hook would register.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

FEATURES = ("tenure_months", "monthly_spend", "support_calls", "late_payments")


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """Weights plus everything the lineage needs."""

    weights: tuple[float, ...]
    bias: float
    means: tuple[float, ...]
    scales: tuple[float, ...]
    dataset_csv: bytes
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def dataset_digest(self) -> str:
        """``sha256:<hex>`` of the training CSV."""
        return "sha256:" + hashlib.sha256(self.dataset_csv).hexdigest()

    @property
    def artifact(self) -> bytes:
        """The serialised model, as it would be stored in the registry."""
        body = {"weights": self.weights, "bias": self.bias, "means": self.means}
        return json.dumps({**body, "scales": self.scales}, sort_keys=True).encode()

    @property
    def artifact_digest(self) -> str:
        """``sha256:<hex>`` of the serialised model."""
        return "sha256:" + hashlib.sha256(self.artifact).hexdigest()

    def predict(self, row: list[float]) -> float:
        """Churn probability of one customer."""
        z = self.bias + sum(
            w * (x - m) / s
            for w, x, m, s in zip(self.weights, row, self.means, self.scales, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-z))


def make_dataset(rows: int = 600, seed: int = 7) -> list[tuple[list[float], int]]:
    """Customers with a churn label that depends on their features, plus noise."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not secrets
    data = []
    for _ in range(rows):
        x = [
            rng.uniform(1, 72),
            rng.uniform(10, 150),
            float(rng.randint(0, 9)),
            float(rng.randint(0, 4)),
        ]
        score = -0.05 * x[0] + 0.01 * x[1] + 0.4 * x[2] + 0.6 * x[3] - 0.5
        data.append((x, int(score + rng.gauss(0, 0.8) > 0)))
    return data


def to_csv(data: list[tuple[list[float], int]]) -> bytes:
    """The dataset as CSV bytes (what its digest covers)."""
    lines = [",".join((*FEATURES, "churned"))]
    lines += [",".join(f"{v:.4f}" for v in x) + f",{y}" for x, y in data]
    return ("\n".join(lines) + "\n").encode()


def train(epochs: int = 200, learning_rate: float = 0.5) -> TrainedModel:
    """Fit the logistic regression by batch gradient descent on standardised features."""
    data = make_dataset()
    n, k = len(data), len(FEATURES)
    means = [sum(x[j] for x, _ in data) / n for j in range(k)]
    scales = [math.sqrt(sum((x[j] - means[j]) ** 2 for x, _ in data) / n) or 1.0 for j in range(k)]
    rows = [([(x[j] - means[j]) / scales[j] for j in range(k)], y) for x, y in data]
    w, b = [0.0] * k, 0.0
    for _ in range(epochs):
        grad_w, grad_b = [0.0] * k, 0.0
        for x, y in rows:
            err = (
                1.0 / (1.0 + math.exp(-(b + sum(wi * xi for wi, xi in zip(w, x, strict=True))))) - y
            )
            grad_b += err
            for j in range(k):
                grad_w[j] += err * x[j]
        w = [wj - learning_rate * gj / n for wj, gj in zip(w, grad_w, strict=True)]
        b -= learning_rate * grad_b / n
    model = TrainedModel(tuple(w), b, tuple(means), tuple(scales), to_csv(data), {}, {})
    correct = sum((model.predict(x) > 0.5) == bool(y) for x, y in data)
    return TrainedModel(
        model.weights,
        model.bias,
        model.means,
        model.scales,
        model.dataset_csv,
        {"epochs": str(epochs), "learning_rate": str(learning_rate), "model": "logreg"},
        {"train_accuracy": round(correct / n, 4)},
    )
