"""flexgen-graph: high-throughput batch generation with offloading, compiled into a replayed plan."""

__version__ = "0.1.0"
