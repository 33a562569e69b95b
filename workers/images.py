"""The image_set backend: seeds → batched GAN forward passes → PNG files → result rows.

Every image has its own seed: item seed ``s`` (given on the item, else the job's ``seed``, else
derived from job id and custom_id like the text kinds) gives image ``i`` the seed
``(s + i) mod 2**63``, and each latent is drawn from its own generator, so an image does not
depend on its batch-mates and any single one can be regenerated from the recorded seeds.
The images of a chunk are cut into batches of ``AIGC_MAX_BATCH_IMAGES`` across items; while
the next batch runs on the device, a thread pool encodes and writes the previous one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from schemas.enums import Kind
from schemas.settings import Settings

from .artifacts import ArtifactStore
from .contract import ClaimedItem, JobInfo, ResultRow, result_row
from .errors import TransientError, halve_after_out_of_memory
from .gan import load_gan, resolve_gan
from . import imaging
from .imaging import encode_grid, encode_png
from .registry import module_bytes, register
from .seeds import derive_seed

log = logging.getLogger("aigc.worker")

SEED_MODULUS = 2**63  # seeds stay within a signed 64-bit column
SEED_RULE = "image i uses seed (s + i) mod 2**63"
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def image_seed(item_seed: int, index: int) -> int:
    """The seed of image ``index`` of an item whose seed is ``item_seed``."""
    return (item_seed + index) % SEED_MODULUS


@dataclass
class _Plan:
    """One item on its way through the batches."""

    item: ClaimedItem
    seed: int
    n: int
    grid: bool
    label: str | None
    folder: str = ""
    left: int = 0
    latency_ms: float = 0.0
    batches: set[int] = field(default_factory=set)
    saved: list[Future | None] = field(default_factory=list)
    kept: list[torch.Tensor | None] = field(default_factory=list)  # for the contact sheet
    sheet: Future | None = None


@register(Kind.image_set)
class ImageSetBackend:
    """Runs image sets on one GAN, loaded once per process, writing to the artifact store."""

    def __init__(self, model: str, settings: Settings) -> None:
        self.settings = settings
        self.path = resolve_gan(model, settings.models_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config = load_gan(self.path, self.device)
        self.memory_bytes = module_bytes(self.model)
        self.labels = tuple(getattr(self.model, "labels", ()))
        self.store = ArtifactStore(settings.artifacts())
        self.pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="aigc-png")
        self.rows_cap: int | None = None  # lowered when a batch ran out of memory

    def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
        """Yield each item's row as its files are written."""
        plans, refused = [], []
        for item in items:
            spec = item.input
            seed = spec.get("seed")
            if seed is None:
                seed = (job.params or {}).get("seed")
            if seed is None:
                seed = derive_seed(job.id, item.custom_id)
            plan = _Plan(item, int(seed), int(spec.get("n_images", 4)), bool(spec.get("grid")),
                         spec.get("label"))
            size = getattr(self.model, "image_size", None)
            if spec.get("size") and size and spec["size"] != f"{size}x{size}":
                refused.append(self._row(
                    job, plan, error_code="size_not_supported",
                    error_message=f"model {job.model} ({self.config['architecture']}) makes "
                    f"{size}x{size} images; got size {spec['size']!r}"))
                continue
            if plan.label is not None and plan.label not in self.labels:
                refused.append(self._row(
                    job, plan, error_code="label_not_supported",
                    error_message=f"model {job.model} ({self.config['architecture']}) "
                    + (f"knows the labels {', '.join(self.labels)}" if self.labels else
                       "is unconditional: it takes no label") + f"; got {plan.label!r}"))
                continue
            plan.folder = self.store.item_folder(job.id, item.custom_id)
            plan.left = plan.n
            plan.saved, plan.kept = [None] * plan.n, [None] * plan.n
            plans.append(plan)
        if refused:
            yield refused
        queue = [(plan, i) for plan in plans for i in range(plan.n)]
        finishing: list[_Plan] = []
        start, number = 0, 0
        while start < len(queue):
            size = min(self.settings.max_batch_images, self.rows_cap or self.settings.max_batch_images)
            batch, start, number = queue[start:start + size], start + size, number + 1
            images, latency_ms = self._forward([image_seed(p.seed, i) for p, i in batch],
                                               [p.label for p, _ in batch])
            # Without torchvision, convert the whole batch at once; threads then only encode.
            pixels = images if imaging.tv_utils is not None else imaging.to_uint8(images)
            finished = []
            for (plan, index), image, pixel in zip(batch, images, pixels):
                if number not in plan.batches:
                    plan.batches.add(number)
                    plan.latency_ms += latency_ms
                plan.saved[index] = self.pool.submit(self._save_image, plan.folder, index, pixel)
                if plan.grid:
                    plan.kept[index] = image
                plan.left -= 1
                if plan.left == 0:
                    if plan.grid:
                        plan.sheet = self.pool.submit(self._save_grid, plan.folder, plan.kept)
                        plan.kept = []
                    finished.append(plan)
            if finishing:  # the previous batch's files were written while this one ran
                yield [self._done_row(job, plan) for plan in finishing]
            finishing = finished
        if finishing:
            yield [self._done_row(job, plan) for plan in finishing]

    def _forward(self, seeds: list[int], labels: list[str | None]) -> tuple[torch.Tensor, float]:
        """(B, C, H, W) float images on the CPU and the forward time; halves on out-of-memory.

        A conditional architecture (one that declares ``labels``) gets each image's label too.
        """
        try:
            started = time.perf_counter()
            kwargs = {"labels": labels} if self.labels else {}
            images = self.model.generate(seeds, **kwargs).float().cpu()
            return images, (time.perf_counter() - started) * 1000
        except torch.OutOfMemoryError:
            half = halve_after_out_of_memory(self.device, len(seeds), "image")
        self.rows_cap = half
        log.warning("out of memory at %d images; retrying as batches of at most %d", len(seeds), half)
        first, first_ms = self._forward(seeds[:half], labels[:half])
        second, second_ms = self._forward(seeds[half:], labels[half:])
        return torch.cat([first, second]), first_ms + second_ms

    def _save_image(self, folder: str, index: int, image: torch.Tensor) -> dict[str, Any]:
        data = encode_png(image)
        uri = self.store.write(folder, f"{index:03d}.png", data)
        return {"uri": uri, "bytes": len(data), "width": image.size(2), "height": image.size(1)}

    def _save_grid(self, folder: str, images: list[torch.Tensor]) -> dict[str, Any]:
        data, width, height = encode_grid(images)
        uri = self.store.write(folder, "grid.png", data)
        return {"uri": uri, "bytes": len(data), "width": width, "height": height}

    def _row(self, job: JobInfo, plan: _Plan, **fields: Any) -> ResultRow:
        return result_row(job, plan.item, seed=plan.seed, device=str(self.device),
                          params={"n_images": plan.n, "seed": plan.seed, "grid": plan.grid,
                                  "label": plan.label, "seed_rule": SEED_RULE}, **fields)

    def _done_row(self, job: JobInfo, plan: _Plan) -> ResultRow:
        try:
            images = [future.result() for future in plan.saved]
            sheet = plan.sheet.result() if plan.sheet else None
        except OSError as exc:  # the store is away (disk full, network): try again later
            raise TransientError(f"writing to the artifact store {self.store.root} failed: {exc}",
                                 code="artifact_store_unavailable") from exc
        for index, image in enumerate(images):
            image["seed"] = image_seed(plan.seed, index)
        uris = [image["uri"] for image in images] + ([sheet["uri"]] if sheet else [])
        output = {"architecture": self.config["architecture"], "width": images[0]["width"],
                  "height": images[0]["height"], "images": images, "grid": sheet}
        return self._row(job, plan, output=output, artifact_uris=uris,
                         latency_ms=round(plan.latency_ms, 3))
