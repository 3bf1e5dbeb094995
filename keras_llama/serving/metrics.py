"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine_occupancy):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("keras_llama_requests", "API requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter(
            "keras_llama_prompt_tokens", "Prompt tokens prefilled", registry=r
        )
        self.generation_tokens = Counter("keras_llama_generation_tokens", "Tokens generated",
                                         registry=r)  # fmt: skip
        self.queue_depth = Gauge(
            "keras_llama_queue_depth", "Requests waiting for a slot", registry=r
        )
        self.running = Gauge("keras_llama_running_requests", "Slots in use", registry=r)
        self.batch_occupancy = Histogram(
            "keras_llama_batch_occupancy", "Rows decoded per decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r,
        )  # fmt: skip
        self.ttft = Histogram("keras_llama_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("keras_llama_request_latency_seconds", "Request latency (end to end)",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self._occupancy = engine_occupancy

    def render(self, engine_stats=None):
        running, waiting = self._occupancy()
        self.running.set(running)
        self.queue_depth.set(waiting)
        return generate_latest(self.registry)
