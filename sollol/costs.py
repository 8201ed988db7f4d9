"""Prices of tokens per node or per model, from the ``[costs]`` table of the config file.

::

    [costs]
    currency = "EUR"                       # a label for reports
    [costs.nodes."box-1"]                  # e.g. the energy a GPU box uses per token
    prompt_per_million_tokens = 0.02
    completion_per_million_tokens = 0.06
    [costs.models."gpt-4o"]                # e.g. a cloud model's price list
    prompt_per_million_tokens = 2.5
    completion_per_million_tokens = 10.0

A model's price, when set, wins over the price of the node that served it.
A request whose model and node both have no price has no cost (None).
"""

from dataclasses import dataclass, field
from typing import Any

from .cluster import model_key
from .config import ConfigError

_PRICE_KEYS = ("prompt_per_million_tokens", "completion_per_million_tokens")


@dataclass(frozen=True, slots=True)
class Price:
    prompt_per_million_tokens: float = 0.0
    completion_per_million_tokens: float = 0.0

    def of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.prompt_per_million_tokens
            + completion_tokens * self.completion_per_million_tokens
        ) / 1e6


@dataclass(frozen=True, slots=True)
class CostTable:
    currency: str = ""
    by_node: dict[str, Price] = field(default_factory=dict)
    by_model: dict[str, Price] = field(default_factory=dict)

    def cost(
        self, model: str, node: str | None, prompt_tokens: int | None, completion_tokens: int | None
    ) -> float | None:
        """Return the price of a request's tokens, or None when neither model nor node has one."""
        price = self.by_model.get(model)
        if price is None and node is not None:
            price = self.by_node.get(node)
        if price is None:
            return None
        return price.of(prompt_tokens or 0, completion_tokens or 0)


def parse_costs(table: Any, *, source: str) -> CostTable:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [costs] must be a table")
    unknown = sorted(set(table) - {"currency", "nodes", "models"})
    if unknown:
        raise ConfigError(f"{source}: unknown [costs] keys: {', '.join(unknown)}")
    currency = table.get("currency", "")
    if not isinstance(currency, str):
        raise ConfigError(f"{source}: [costs] currency must be a string")
    return CostTable(
        currency=currency,
        by_node=_prices(table.get("nodes", {}), f"{source} [costs.nodes]"),
        by_model={
            model_key(name): price
            for name, price in _prices(table.get("models", {}), f"{source} [costs.models]").items()
        },
    )


def _prices(table: Any, where: str) -> dict[str, Price]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of tables")
    prices = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}.{name} must be a table")
        unknown = sorted(set(entry) - set(_PRICE_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{name}: unknown keys: {', '.join(unknown)}")
        values = {}
        for key in _PRICE_KEYS:
            value = entry.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}.{name}: {key} must be a number of at least 0")
            values[key] = float(value)
        prices[name] = Price(**values)
    return prices
