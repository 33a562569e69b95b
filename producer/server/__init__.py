"""The OpenAI-compatible HTTP API (``aigc serve``): Files and Batches over aigc jobs."""

from .app import create_app

__all__ = ["create_app"]
