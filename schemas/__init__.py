"""The contract: item specs, tables, statuses, settings and the queue message shape.

Imports nothing else of aigc; ``producer`` and ``workers`` both build on it.
"""

from .enums import ItemStatus, JobStatus, Kind
from .parsing import InputError, ParsedItem, Problem
from .settings import Settings, get_settings
from .specs import AdCopySpec, ArticleSpec, GenerationParams, ImageSetSpec
from .tables import Item, Job, Result

__all__ = [
    "AdCopySpec", "ArticleSpec", "GenerationParams", "ImageSetSpec", "InputError", "Item",
    "ItemStatus", "Job", "JobStatus", "Kind", "ParsedItem", "Problem", "Result", "Settings",
    "get_settings",
]
