"""The simulated cluster and workload `sollol evaluate` runs every policy on.

The default scenario is a heterogeneous cluster of six nodes. Two GPU boxes
are fast at both prefill and decode. A many-core CPU server prefills well but
decodes slowly (its time to first token flatters it), and three small
machines are slow, one of them flaky. Three models of different sizes share
the cluster, and the largest fits on only three nodes. Requests come as a
Poisson stream with periodic bursts, in three classes: chat, long-context
retrieval and long-form generation.

The speeds are illustrative orders of magnitude for a 1B-parameter model
(scaled by each model's ``cost_factor``), not measurements of any hardware.
"""

from dataclasses import dataclass, field, replace

GB = 1024**3


@dataclass(frozen=True, slots=True)
class NodeProfile:
    name: str
    prefill_tps: float  # prompt tokens per second for a model of cost_factor 1
    decode_tps: float  # output tokens per second of one stream, cost_factor 1
    slots: int
    memory_bytes: int
    load_bytes_per_s: float  # how fast a model loads into memory
    failure_rate: float  # share of attempts that fail part-way
    gpu: bool = False
    # Each further stream running on the node slows every stream's decode by
    # this share, as batched decoding shares compute.
    batch_slowdown: float = 0.15


@dataclass(frozen=True, slots=True)
class ModelProfile:
    name: str
    size_bytes: int
    cost_factor: float  # prefill and decode take this many times as long as cost_factor 1
    share: float  # share of requests for this model


@dataclass(frozen=True, slots=True)
class RequestClass:
    name: str
    share: float
    prompt_median_tokens: float  # prompt lengths are log-normal around this median
    prompt_sigma: float
    max_tokens: int
    # Each reply's length is max_tokens times a uniform draw from this range.
    output_share: tuple[float, float]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    nodes: tuple[NodeProfile, ...]
    models: tuple[ModelProfile, ...]
    classes: tuple[RequestClass, ...]
    rate_per_s: float  # mean arrival rate outside bursts
    burst_every_s: float
    burst_length_s: float
    burst_factor: float  # arrival rate multiplier during a burst
    requests: int  # requests in the measured trace every policy runs
    warmup_requests: int  # requests under sollol_heuristic that make the training history
    seed: int = 0
    probe_interval_s: float = 2.0  # how often node queue depth and loaded models are polled
    max_attempts: int = 2
    explore_share: float = 0.02
    # Spread of the router's prompt-length estimate around the true length
    # (log-normal sigma), as counting characters only estimates tokens.
    prompt_estimate_sigma: float = 0.2
    policies: tuple[str, ...] = field(
        default=(
            "round_robin",
            "least_loaded",
            "sollol_heuristic",
            "predicted_latency",
            "learned",
            "oracle",
        )
    )

    def scaled(self, requests: int | None, warmup_requests: int | None) -> "Scenario":
        return replace(
            self,
            requests=requests or self.requests,
            warmup_requests=warmup_requests or self.warmup_requests,
        )


DEFAULT_SCENARIO = Scenario(
    name="default",
    nodes=(
        NodeProfile("gpu-a", 4000, 90, 4, 24 * GB, 2 * GB, 0.002, gpu=True),
        NodeProfile("gpu-b", 3000, 70, 4, 16 * GB, 2 * GB, 0.005, gpu=True),
        NodeProfile("cpu-big", 1500, 14, 4, 64 * GB, 1 * GB, 0.005),
        NodeProfile("cpu-a", 250, 18, 2, 32 * GB, 0.5 * GB, 0.01),
        NodeProfile("cpu-b", 200, 14, 2, 16 * GB, 0.5 * GB, 0.02),
        NodeProfile("edge", 120, 10, 1, 8 * GB, 0.25 * GB, 0.08),
    ),
    models=(
        ModelProfile("llama-1b", int(1.5 * GB), 1.0, 0.5),
        ModelProfile("llama-8b", 6 * GB, 3.0, 0.35),
        ModelProfile("qwen-32b", 20 * GB, 8.0, 0.15),
    ),
    classes=(
        RequestClass("chat", 0.6, 300, 0.8, 256, (0.2, 1.0)),
        RequestClass("retrieval", 0.25, 2500, 0.5, 128, (0.3, 1.0)),
        RequestClass("generation", 0.15, 200, 0.6, 768, (0.5, 1.0)),
    ),
    rate_per_s=0.6,
    burst_every_s=120.0,
    burst_length_s=15.0,
    burst_factor=3.0,
    requests=6000,
    warmup_requests=8000,
)
