"""Metric sinks (JSONL, console, Weights & Biases) and MoE load metric collection."""

from mmfm.metrics.moe import collect_moe_metrics, reduce_metric
from mmfm.metrics.sinks import ConsoleSink, JsonlSink, MetricSink, MetricsLogger, WandbSink

__all__ = ["ConsoleSink", "JsonlSink", "MetricSink", "MetricsLogger", "WandbSink",
           "collect_moe_metrics", "reduce_metric"]
