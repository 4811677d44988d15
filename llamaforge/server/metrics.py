"""Prometheus metrics of one server: requests, tokens, queue and batch, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llamaforge.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """One registry per app, so several servers in one process (tests) keep separate counts."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llamaforge_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llamaforge_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("llamaforge_generated_tokens", "Tokens generated for clients",
                                        registry=self.registry)
        self.time_to_first_token = Histogram("llamaforge_time_to_first_token_seconds",
                                             "From request arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=self.registry)
        self.inter_token_latency = Histogram("llamaforge_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request", buckets=LATENCY_BUCKETS,
                                             registry=self.registry)
        gauges = {
            "llamaforge_queue_depth": ("Requests waiting for a slot", lambda: engine.stats().waiting),
            "llamaforge_running_batch_size": ("Sequences in the running batch", lambda: engine.stats().running),
            "llamaforge_peak_batch_size": ("Largest running batch so far", lambda: engine.stats().peak_running),
            "llamaforge_free_slots": ("Sequences that may still join the batch", lambda: engine.stats().free_slots),
            "llamaforge_kv_cache_blocks": ("Blocks of the KV cache", lambda: engine.stats().kv_blocks),
            "llamaforge_kv_cache_blocks_used": ("KV-cache blocks held by running sequences (the rest are free, maybe "
                                                "keeping a finished sequence's tokens)",
                                                lambda: engine.stats().kv_blocks_used),
            "llamaforge_engine_steps": ("Engine steps run", lambda: engine.stats().steps),
            "llamaforge_batched_decode_steps": ("Decode steps that ran more than one sequence",
                                                lambda: engine.stats().batched_steps),
            "llamaforge_spec_draft_tokens": ("Tokens drafted for speculative decoding and checked",
                                             lambda: engine.stats().draft_tokens),
            "llamaforge_spec_accepted_tokens": ("Drafted tokens the model accepted",
                                                lambda: engine.stats().accepted_tokens),
            "llamaforge_spec_acceptance_rate": ("Accepted / drafted tokens so far (0 before any draft)",
                                                lambda: engine.stats().acceptance_rate),
            "llamaforge_prefix_cache_queries": ("Prompt tokens of admitted requests, looked up in the prefix cache",
                                                lambda: engine.stats().prefix_cache_queries),
            "llamaforge_prefix_cache_hits": ("Prompt tokens whose keys and values the prefix cache reused",
                                             lambda: engine.stats().prefix_cache_hits),
            "llamaforge_prefix_cache_hit_rate": ("Reused / looked-up prompt tokens so far (0 before any request)",
                                                 lambda: engine.stats().prefix_cache_hit_rate),
            "llamaforge_prefix_cache_tokens": ("Tokens whose keys and values free blocks keep for later requests",
                                               lambda: engine.stats().cached_tokens),
            "llamaforge_lora_adapters": ("LoRA adapters loaded beside the base", lambda: engine.stats().adapters),
        }
        for name, (description, read) in gauges.items():
            Gauge(name, description, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)

