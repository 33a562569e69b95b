"""The image_set backend in process, on a tiny random DCGAN: seeds, files, grids, stores."""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
from PIL import Image
from torch import nn

from aigc import api
from aigc.schemas.parsing import InputError
from aigc.schemas.settings import Settings
from conftest import need
from aigc.workers import imaging
from aigc.workers.artifacts import ArtifactStore, safe_segment
from aigc.workers.errors import ArtifactPathError, ModelNotFoundError, TransientError, UnknownArchitectureError
from aigc.workers.gan import ModelInvalidError, load_gan, resolve_gan, save_gan
from aigc.workers.images import ImageSetBackend, image_seed
from aigc.workers.registry import architecture_for, register_architecture
from aigc.workers.seeds import derive_seed

from tiny_models import build_tiny_dcgan

HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b", "nul\x00byte",
               "x" * 5000, "..\\..\\windows", "~root", "-", " ", "grid.png/../..", "é/🙂"]


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory) -> Path:
    return build_tiny_dcgan(tmp_path_factory.mktemp("gan") / "tiny-dcgan")


def backend(model: Path, root: str, **settings) -> ImageSetBackend:
    return ImageSetBackend(str(model), Settings(artifact_root=root, **settings))


def run(gen: ImageSetBackend, specs: list[dict], job_id: str = "job-1", params: dict | None = None) -> list[dict]:
    job = SimpleNamespace(id=job_id, kind="image_set", model="tiny", params=params or {})
    items = [SimpleNamespace(id=i, custom_id=spec.pop("custom_id", f"item-{i}"), input=spec)
             for i, spec in enumerate(dict(s) for s in specs)]
    # The columns the backend set (as the row dicts were before ResultRow).
    return [{k: v for k, v in row if v is not None} for rows in gen.run(job, items) for row in rows]


def read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as stream:
        return stream.read()


def test_same_seed_gives_identical_png_bytes(tiny_gan, tmp_path):
    gen = backend(tiny_gan, str(tmp_path / "a"))
    first = run(gen, [{"seed": 42, "n_images": 3}], job_id="job-a")[0]
    second = run(gen, [{"seed": 42, "n_images": 3}], job_id="job-b")[0]

    assert first["artifact_uris"] != second["artifact_uris"]  # different jobs, different files
    assert [read(u) for u in first["artifact_uris"]] == [read(u) for u in second["artifact_uris"]]
    assert len({read(u) for u in first["artifact_uris"]}) == 3  # three different images


def test_an_image_does_not_depend_on_its_batch(tiny_gan, tmp_path):
    """Batches of 1 and of 7, other items around it: image i of seed s is the same file."""
    alone = run(backend(tiny_gan, str(tmp_path / "a"), max_batch_images=1), [{"seed": 7, "n_images": 4}])
    crowded = run(backend(tiny_gan, str(tmp_path / "b"), max_batch_images=7),
                  [{"seed": 1, "n_images": 3}, {"seed": 7, "n_images": 4}, {"seed": 9, "n_images": 2}])
    again = run(backend(tiny_gan, str(tmp_path / "c")), [{"seed": image_seed(7, 2), "n_images": 1}])

    images = [read(u) for u in alone[0]["artifact_uris"]]
    assert images == [read(u) for u in crowded[1]["artifact_uris"]]
    assert read(again[0]["artifact_uris"][0]) == images[2]  # any one image, regenerated alone


def test_seeds_are_recorded_and_unseeded_items_get_a_stable_derived_seed(tiny_gan, tmp_path):
    gen = backend(tiny_gan, str(tmp_path))
    rows = run(gen, [{"custom_id": "given", "seed": 2**63 - 2, "n_images": 3}, {"custom_id": "free", "n_images": 2}],
               job_id="job-s")
    given, free = rows

    assert given["seed"] == 2**63 - 2
    assert [i["seed"] for i in given["output"]["images"]] == [2**63 - 2, 2**63 - 1, 0]  # wraps
    assert free["seed"] == derive_seed("job-s", "free")
    assert [i["seed"] for i in free["output"]["images"]] == [free["seed"], free["seed"] + 1]
    assert given["params"] == {"n_images": 3, "seed": 2**63 - 2, "grid": False, "label": None,
                               "seed_rule": "image i uses seed (s + i) mod 2**63"}
    job_seeded = run(gen, [{"custom_id": "free", "n_images": 1}], job_id="job-s", params={"seed": 5})
    assert job_seeded[0]["seed"] == 5  # the job's seed applies to items without their own


def test_a_png_decodes_to_64x64_rgb_and_is_not_constant(tiny_gan, tmp_path):
    row = run(backend(tiny_gan, str(tmp_path)), [{"seed": 3, "n_images": 2}])[0]

    for record, uri in zip(row["output"]["images"], row["artifact_uris"]):
        data = read(uri)
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        assert (record["bytes"], record["width"], record["height"]) == (len(data), 64, 64)
        assert len(image.getcolors(64 * 64)) > 100  # not a flat colour
        assert all(low < high for low, high in image.getextrema())
    assert (row["output"]["width"], row["output"]["height"], row["output"]["architecture"]) == (64, 64, "dcgan")
    assert row["device"] == "cpu" and row["latency_ms"] > 0 and "error_code" not in row


def test_grid_on_and_off(tiny_gan, tmp_path):
    rows = run(backend(tiny_gan, str(tmp_path)), [
        {"custom_id": "on", "seed": 1, "n_images": 5, "grid": True},
        {"custom_id": "off", "seed": 1, "n_images": 5},
        {"custom_id": "one", "seed": 1, "n_images": 1, "grid": True},
    ])
    on, off, one = rows

    assert len(on["artifact_uris"]) == 6 and on["artifact_uris"][-1].endswith("/grid.png")
    assert on["output"]["grid"]["uri"] == on["artifact_uris"][-1]
    sheet = Image.open(io.BytesIO(read(on["artifact_uris"][-1])))
    assert sheet.size == (3 * 66 + 2, 2 * 66 + 2)  # 3 columns, 2 rows, 2-pixel black padding
    assert (on["output"]["grid"]["width"], on["output"]["grid"]["height"]) == sheet.size
    assert sheet.getpixel((0, 0)) == (0, 0, 0) and sheet.getpixel((2 * 66 + 10, 66 + 10)) == (0, 0, 0)
    first = Image.open(io.BytesIO(read(on["artifact_uris"][0])))
    assert sheet.crop((2, 2, 66, 66)).tobytes() == first.tobytes()  # the first image, top left
    assert off["output"]["grid"] is None and len(off["artifact_uris"]) == 5
    assert not any(u.endswith("grid.png") for u in off["artifact_uris"])
    assert [read(u) for u in off["artifact_uris"]] == [read(u) for u in on["artifact_uris"][:5]]
    assert Image.open(io.BytesIO(read(one["artifact_uris"][-1]))).size == (64, 64)


def test_hostile_ids_stay_inside_the_artifact_root(tmp_path):
    root = tmp_path / "root"
    store = ArtifactStore(str(root))
    folders = set()
    for custom_id in HOSTILE_IDS:
        for job_id in ("job", "../../escape", "/abs"):
            folder = store.item_folder(job_id, custom_id)
            uri = store.write(folder, "000.png", b"png")
            path = Path(uri.removeprefix("file://"))
            assert path.resolve().is_relative_to(root.resolve()), (custom_id, uri)
            assert "\x00" not in uri and len(Path(folder).name) <= 60
            folders.add(folder)
    assert len(folders) == 3 * len(HOSTILE_IDS)  # distinct ids never share a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing written beside it
    for bad in ("../x.png", "a/b.png", "", ".png/.."):
        with pytest.raises(ArtifactPathError):
            store.write(store.item_folder("job", "a"), bad, b"x")


def test_hostile_ids_through_the_backend(tiny_gan, tmp_path):
    root = tmp_path / "root"
    rows = run(backend(tiny_gan, str(root)), [{"custom_id": c, "n_images": 1} for c in HOSTILE_IDS],
               job_id="../../job")
    assert len(rows) == len(HOSTILE_IDS)
    for row in rows:
        assert Path(row["artifact_uris"][0].removeprefix("file://")).resolve().is_relative_to(root.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_safe_segment_keeps_plain_job_ids_and_hashes_custom_ids():
    job_id = str(uuid.uuid4())
    assert safe_segment(job_id, always_hash=False) == job_id
    assert safe_segment("../../etc/passwd").startswith("etc-passwd-")
    assert safe_segment("a b") != safe_segment("a-b") and safe_segment("").startswith("item-")


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_an_fsspec_url_root_works(tiny_gan, tmp_path, scheme):
    root = f"memory://aigc-{uuid.uuid4().hex}/art" if scheme == "memory" else f"file://{tmp_path}/art"
    row = run(backend(tiny_gan, root), [{"seed": 1, "n_images": 2, "grid": True}])[0]

    assert all(u.startswith(f"{scheme}://") for u in row["artifact_uris"])
    assert Image.open(io.BytesIO(read(row["artifact_uris"][0]))).size == (64, 64)
    if scheme == "file":
        assert len(list((tmp_path / "art").rglob("*.png"))) == 3


def test_a_label_on_an_unconditional_model_is_an_error_row(tiny_gan, tmp_path):
    rows = run(backend(tiny_gan, str(tmp_path)), [{"custom_id": "cat", "label": "cats", "n_images": 1},
                                                  {"custom_id": "ok", "n_images": 1}])
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["cat"]["error_code"] == "label_not_supported"
    assert "unconditional" in by_id["cat"]["error_message"]
    assert "artifact_uris" not in by_id["cat"] and len(by_id["ok"]["artifact_uris"]) == 1


def test_invalid_image_items_are_refused_naming_line_and_field(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(InputError) as caught:
        api.submit("image_set", [{"n_images": 2}, {"n_images": 0}, {"n_images": 300, "grid": "maybe"}],
                   settings=settings)
    text = str(caught.value)
    assert "2:n_images" in text and "3:n_images" in text and "3:grid" in text


def test_pillow_grid_layout():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2) + 1
    grid = imaging.make_grid(images, nrow=3, padding=1)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert torch.equal(grid[:, 1:3, 1:3], images[0]) and torch.equal(grid[:, 4:6, 4:6], images[4])
    assert grid[:, 0].eq(0).all() and grid[:, 4:6, 7:9].eq(0).all()  # padding and the empty cell
    assert torch.equal(imaging.make_grid(images[:1], nrow=3), images[0])


@pytest.mark.gpu  # torchvision's wheels are CUDA builds: run with `pytest -m gpu` where aigc[gpu] is
def test_torchvision_and_pillow_paths_give_the_same_bytes():
    if imaging.tv_utils is None:
        need("torchvision", ImportError("torchvision is not installed (pip install 'aigc[gpu]')"))
    torch.manual_seed(0)
    images = torch.rand(5, 3, 64, 64) * 2.2 - 1.1  # beyond [-1, 1]: clamping must agree too
    for image in images:
        assert imaging.encode_png(image, use_torchvision=True) == imaging.encode_png(image, use_torchvision=False)
    assert imaging.encode_grid(images, use_torchvision=True) == imaging.encode_grid(images, use_torchvision=False)


def test_missing_or_broken_models_fail_clearly(tiny_gan, tmp_path):
    with pytest.raises(ModelNotFoundError, match="aigc models fetch dcgan-faces"):
        resolve_gan("dcgan-faces", tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_gan(str(tmp_path / "nowhere"), tmp_path)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architecture": "stylegan9"}))
    (unknown / "model.safetensors").write_bytes((tiny_gan / "model.safetensors").read_bytes())
    with pytest.raises(UnknownArchitectureError, match="'stylegan9'.*known: .*dcgan"):
        load_gan(unknown)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((tiny_gan / "config.json").read_text()) | {"ngf": 5}
    (wrong / "config.json").write_text(json.dumps(config))
    (wrong / "model.safetensors").write_bytes((tiny_gan / "model.safetensors").read_bytes())
    with pytest.raises(ModelInvalidError, match="does not fit"):
        load_gan(wrong)


@dataclass
class _StripesConfig:
    width: int = 8  # image side in pixels


@register_architecture("test-stripes")
class _Stripes(nn.Module):
    """A new architecture is one class and a registration; the backend needs no change."""

    config_class = _StripesConfig
    labels = ("red", "blue")

    def __init__(self, config: _StripesConfig):
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(torch.ones(1))

    @torch.inference_mode()
    def generate(self, seeds, labels):
        """Flat images: white for "red", black otherwise (a conditional model gets labels)."""
        side = self.config.width
        return torch.stack([torch.full((3, side, side), 1.0 if label == "red" else -1.0) * self.scale
                            for label in labels])


def test_a_new_architecture_registers_by_name_and_runs(tmp_path):
    folder = save_gan(_Stripes(_StripesConfig(width=8)), tmp_path / "stripes")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "test-stripes"
    assert architecture_for("test-stripes") is _Stripes
    with pytest.raises(ValueError, match="already"):
        register_architecture("test-stripes")(_Stripes)

    rows = run(backend(folder, str(tmp_path / "out")), [
        {"custom_id": "red", "n_images": 2, "label": "red"}, {"custom_id": "blue", "n_images": 1, "label": "blue"},
        {"custom_id": "green", "n_images": 1, "label": "green"}])

    red, blue, green = (next(r for r in rows if r["custom_id"] == c) for c in ("red", "blue", "green"))
    assert red["output"]["architecture"] == "test-stripes" and red["output"]["width"] == 8
    colours = [Image.open(io.BytesIO(read(u))).getpixel((0, 0)) for u in red["artifact_uris"] + blue["artifact_uris"]]
    assert colours == [(255, 255, 255), (255, 255, 255), (0, 0, 0)]
    assert green["error_code"] == "label_not_supported" and "red, blue" in green["error_message"]


def test_weights_load_strictly(tiny_gan):
    model, config = load_gan(tiny_gan)
    assert not model.training and config["architecture"] == "dcgan"
    assert os.path.getsize(tiny_gan / "model.safetensors") < 200_000


def test_out_of_memory_halves_the_image_batch_and_keeps_every_image(tiny_gan, tmp_path, monkeypatch):
    specs = [{"seed": 3, "n_images": 5}, {"seed": 11, "n_images": 3}]
    expected = run(backend(tiny_gan, str(tmp_path / "a"), max_batch_images=8), specs)
    gen = backend(tiny_gan, str(tmp_path / "b"), max_batch_images=8)
    real, sizes = gen.model.generate, []

    def small_device(seeds, **kwargs):  # as if only 3 images fit in memory
        sizes.append(len(seeds))
        if len(seeds) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(seeds, **kwargs)

    monkeypatch.setattr(gen.model, "generate", small_device)
    got = run(gen, specs)

    assert [[read(u) for u in row["artifact_uris"]] for row in got] == \
        [[read(u) for u in row["artifact_uris"]] for row in expected]
    assert sizes[0] == 8 and gen.rows_cap is not None and gen.rows_cap <= 3
    sizes.clear()
    run(gen, specs)
    assert sizes and max(sizes) <= 3  # later batches start at the size that fit

    def no_memory_at_all(seeds, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gen.model, "generate", no_memory_at_all)
    with pytest.raises(TransientError, match="out of memory generating a single image"):
        run(gen, [{"seed": 1, "n_images": 1}])


def test_rows_of_a_batch_come_once_the_next_batch_has_run(tiny_gan, tmp_path):
    gen = backend(tiny_gan, str(tmp_path / "a"), max_batch_images=2)
    real, forwards = gen.model.generate, []

    def counting(seeds, **kwargs):
        forwards.append(len(seeds))
        return real(seeds, **kwargs)

    gen.model.generate = counting
    job = SimpleNamespace(id="job-1", kind="image_set", model="tiny", params={})
    items = [SimpleNamespace(id=i, custom_id=f"item-{i}", input={"seed": i, "n_images": 2})
             for i in range(3)]
    seen = [(len(forwards), [row.custom_id for row in rows]) for rows in gen.run(job, items)]

    # item-0 is finished by the first pass and yielded only once the second pass has run.
    assert seen == [(2, ["item-0"]), (3, ["item-1"]), (3, ["item-2"])]
    assert forwards == [2, 2, 2]
