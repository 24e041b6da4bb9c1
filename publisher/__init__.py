"""The publisher: a client library for the aggregator and the `python -m publisher` CLI."""

from .client import BatchResult, Publisher, PublishError
from .handler import AggregatorHandler

__all__ = ["AggregatorHandler", "BatchResult", "PublishError", "Publisher"]
