"""The publisher: a client library for the aggregator and the `python -m publisher` CLI."""

from .client import BatchResult, Publisher, PublishError

__all__ = ["BatchResult", "PublishError", "Publisher"]
