"""The image_set backend: seeds → batched GAN forward passes → PNG files → result rows.

Every image has its own seed: item seed ``s`` (given on the item, else the job's ``seed``, else
derived from job id and custom_id like the text kinds) gives image ``i`` the seed
``(s + i) mod 2**63``, and each latent is drawn from its own generator, so an image does not
depend on its batch-mates and any single one can be regenerated from the recorded seeds.
The images of a chunk are cut into batches of ``AIGC_MAX_BATCH_IMAGES`` across items; while
the next batch runs on the device, a thread pool encodes and writes the previous one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings

from .artifacts import ArtifactStore
from .batching import AdaptiveBatch
from .contract import ClaimedItem, JobInfo, ResultRow, result_row
from .errors import TransientError
from .gan import load_gan, resolve_gan
from . import imaging
from .imaging import encode_grid, encode_png
from .registry import module_bytes, register
from .seeds import derive_seed

SEED_MODULUS = 2**63  # seeds stay within a signed 64-bit column
SEED_RULE = "image i uses seed (s + i) mod 2**63"
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def image_seed(item_seed: int, index: int) -> int:
    """The seed of image ``index`` of an item whose seed is ``item_seed``."""
    return (item_seed + index) % SEED_MODULUS


@dataclass(frozen=True)
class ImagePlan:
    """What one item asks for, settled before any forward pass."""

    item: ClaimedItem
    seed: int  # image i uses image_seed(seed, i)
    n: int  # images to make
    grid: bool  # and a contact sheet of them
    label: str | None  # for conditional architectures

    @property
    def params(self) -> dict[str, Any]:
        """What the row records as the parameters the item ran with."""
        return {"n_images": self.n, "seed": self.seed, "grid": self.grid, "label": self.label,
                "seed_rule": SEED_RULE}


@dataclass(eq=False)
class _ImageSet:
    """One planned item's files while the pool writes them, image by image, in order."""

    plan: ImagePlan
    folder: str
    saved: list[Future] = field(default_factory=list)  # each image's write: {uri, bytes, ...}
    kept: list[torch.Tensor] = field(default_factory=list)  # float images, for the contact sheet
    sheet: Future | None = None  # the contact sheet's write, once its last image is in
    latency_ms: float = 0.0  # forward time of the batches it was in


_Image = tuple["_ImageSet", int]  # one image to make: its set and its index there


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
        self.batching = AdaptiveBatch(self.device, "image")  # halved when a batch runs out of memory
        # One throw-away image. The first forward pass after other torch work in this process (a
        # text model, say) sometimes splits oneDNN's deconvolutions differently and lands a
        # rounding step away in rare pixels; every later pass matches a fresh process, so the
        # same seed gives the same PNG bytes whatever the worker ran before.
        with torch.inference_mode():
            self.model.generate([0], **({"labels": [self.labels[0]]} if self.labels else {}))

    @property
    def rows_cap(self) -> int | None:
        """The most images a batch may have on this device since one ran out of memory, or None."""
        return self.batching.cap

    def run(self, job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]:
        """Yield each item's row once its files are written: plan every item, then per batch of
        images a forward pass, their files handed to the pool, and the rows of the items the
        previous batch finished (written while this one ran)."""
        plans, refused = self._plan(job, items)
        sets = [_ImageSet(plan, self.store.item_folder(job.id, plan.item.custom_id)) for plan in plans]
        if refused:
            yield refused
        queue = [(image_set, index) for image_set in sets for index in range(image_set.plan.n)]
        writing: list[_ImageSet] = []  # sets whose last image was in the previous batch
        for batch in self._batches(queue):
            images, latency_ms = self._forward(batch)  # (B, C, H, W)
            finished = self._save(batch, images, latency_ms)
            if writing:
                yield [self._done_row(job, image_set) for image_set in writing]
            writing = finished
        if writing:
            yield [self._done_row(job, image_set) for image_set in writing]

    def _plan(self, job: JobInfo, items: list[ClaimedItem]) -> tuple[list[ImagePlan], list[ResultRow]]:
        """The plans of the items this model can make, and the error rows of those it cannot."""
        plans, refused = [], []
        for item in items:
            seed = item.input.get("seed")
            if seed is None:
                seed = (job.params or {}).get("seed")
            if seed is None:
                seed = derive_seed(job.id, item.custom_id)
            plan = ImagePlan(item, int(seed), int(item.input.get("n_images", 4)),
                             bool(item.input.get("grid")), item.input.get("label"))
            refusal = self._refusal(job, plan)
            if refusal is None:
                plans.append(plan)
            else:
                refused.append(refusal)
        return plans, refused

    def _refusal(self, job: JobInfo, plan: ImagePlan) -> ResultRow | None:
        """The error row of an item asking for what this model does not make, else None."""
        size, wanted = getattr(self.model, "image_size", None), plan.item.input.get("size")
        if wanted and size and wanted != f"{size}x{size}":
            return self._row(job, plan, error_code="size_not_supported",
                             error_message=f"model {job.model} ({self.config['architecture']}) makes "
                             f"{size}x{size} images; got size {wanted!r}")
        if plan.label is not None and plan.label not in self.labels:
            return self._row(job, plan, error_code="label_not_supported",
                             error_message=f"model {job.model} ({self.config['architecture']}) "
                             + (f"knows the labels {', '.join(self.labels)}" if self.labels else
                                "is unconditional: it takes no label") + f"; got {plan.label!r}")
        return None

    def _batches(self, queue: list[_Image]) -> Iterator[list[_Image]]:
        """``queue`` in order, cut into batches of ``AIGC_MAX_BATCH_IMAGES`` or of what fit in
        memory, decided as each batch starts."""
        start = 0
        while start < len(queue):
            size = self.batching.limit(self.settings.max_batch_images)
            yield queue[start:start + size]
            start += size

    def _forward(self, batch: list[_Image]) -> tuple[torch.Tensor, float]:
        """(B, C, H, W) float images on the CPU and the forward time, halving on out-of-memory."""
        seeds = [image_seed(image_set.plan.seed, index) for image_set, index in batch]
        labels = [image_set.plan.label for image_set, _ in batch]
        parts = list(self.batching.run(len(batch),
                                       lambda part: self._generate(seeds[part], labels[part])))
        images = parts[0][0] if len(parts) == 1 else torch.cat([images for images, _ in parts])
        return images, sum(ms for _, ms in parts)

    def _generate(self, seeds: list[int], labels: list[str | None]) -> tuple[torch.Tensor, float]:
        """One forward pass. A conditional architecture (one that declares ``labels``) gets
        each image's label too."""
        started = time.perf_counter()
        kwargs = {"labels": labels} if self.labels else {}
        images = self.model.generate(seeds, **kwargs).float().cpu()  # (B, C, H, W) in [-1, 1]
        return images, (time.perf_counter() - started) * 1000

    def _save(self, batch: list[_Image], images: torch.Tensor, latency_ms: float) -> list[_ImageSet]:
        """Hand the batch's files to the pool; the sets whose last image this batch made."""
        # Without torchvision, convert the whole batch at once; threads then only encode.
        pixels = images if imaging.tv_utils is not None else imaging.to_uint8(images)
        for image_set in dict.fromkeys(image_set for image_set, _ in batch):
            image_set.latency_ms += latency_ms
        finished = []
        for (image_set, index), image, pixel in zip(batch, images, pixels):
            image_set.saved.append(self.pool.submit(self._save_image, image_set.folder, index, pixel))
            if image_set.plan.grid:
                image_set.kept.append(image)
            if index == image_set.plan.n - 1:  # a set's images are queued in order
                if image_set.plan.grid:
                    image_set.sheet = self.pool.submit(self._save_grid, image_set.folder, image_set.kept)
                    image_set.kept = []
                finished.append(image_set)
        return finished

    def _save_image(self, folder: str, index: int, image: torch.Tensor) -> dict[str, Any]:
        data = encode_png(image)
        uri = self.store.write(folder, f"{index:03d}.png", data)
        return {"uri": uri, "bytes": len(data), "width": image.size(2), "height": image.size(1)}

    def _save_grid(self, folder: str, images: list[torch.Tensor]) -> dict[str, Any]:
        data, width, height = encode_grid(images)
        uri = self.store.write(folder, "grid.png", data)
        return {"uri": uri, "bytes": len(data), "width": width, "height": height}

    def _row(self, job: JobInfo, plan: ImagePlan, **fields: Any) -> ResultRow:
        return result_row(job, plan.item, seed=plan.seed, device=str(self.device),
                          params=plan.params, **fields)

    def _done_row(self, job: JobInfo, image_set: _ImageSet) -> ResultRow:
        try:
            images = [future.result() for future in image_set.saved]
            sheet = image_set.sheet.result() if image_set.sheet else None
        except OSError as exc:  # the store is away (disk full, network): try again later
            raise TransientError(f"writing to the artifact store {self.store.root} failed: {exc}",
                                 code="artifact_store_unavailable") from exc
        for index, image in enumerate(images):
            image["seed"] = image_seed(image_set.plan.seed, index)
        uris = [image["uri"] for image in images] + ([sheet["uri"]] if sheet else [])
        output = {"architecture": self.config["architecture"], "width": images[0]["width"],
                  "height": images[0]["height"], "images": images, "grid": sheet}
        return self._row(job, image_set.plan, output=output, artifact_uris=uris,
                         latency_ms=round(image_set.latency_ms, 3))
