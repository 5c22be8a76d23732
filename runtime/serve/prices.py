"""The dated price table (prices.json beside this file): what a running Modal container costs per second.

The service reads it for its cost metrics (runtime.serve.metrics); benchmarks/cost.py prices requests, months and
warm schedules from the same table. Plain Python: the table is package data, read with the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import ConfigError

PRICES_PATH = Path(__file__).with_name("prices.json")
BY_DEVICE = {"cuda": "modal-a10g", "cpu": "modal-cpu"}  # the container priced when none is named


def load_prices(path: str | Path = PRICES_PATH) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def rate_per_s(container: dict, rates: dict) -> float:
    """Dollars per second of one running container: GPU + CPU cores + memory."""
    gpu = rates["gpu_per_s"][container["gpu"]] if container.get("gpu") else 0.0
    return gpu + container["cpu_cores"] * rates["cpu_core_per_s"] + container["memory_gib"] * rates["memory_gib_per_s"]


def container_rate(name: str | None, device: str, prices: dict | None = None) -> tuple[str, float, str]:
    """(container, dollars per second, the table's date) for the named container, or the device's default."""
    prices = prices or load_prices()
    name = name or BY_DEVICE.get(device, "modal-cpu")
    if name not in prices["containers"]:
        raise ConfigError(f"PERCEPIANO_PRICE_CONTAINER={name!r} is not in the price table {PRICES_PATH.name}: "
                          f"choose one of {sorted(prices['containers'])}")
    return name, rate_per_s(prices["containers"][name], prices["rates"]), prices["read_on"]
