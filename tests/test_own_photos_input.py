"""A user's own photo folder at ingest (issue 22, "Bad input"): each odd case gets a sensible conversion or a
clear message, and nothing is dropped silently (listed = kept + quarantined, said in the dataset card).

16-bit samples and EXIF orientation on small images are in tests/test_bad_input.py (issue 20).
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from sslvision import ingest
from sslvision.stages.ingest import dataset_card


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _blocks(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(size // 4, 0).repeat(size // 4, 1))


def _ingest(source: Path, out: Path, **kw) -> dict:
    kw = {"workers": 0, "cache_dir": "", "size": 16, **kw}
    return ingest.run_ingest(ingest.IngestParams(**kw), source, out)


def _card(metrics: dict, out: Path) -> str:
    return dataset_card(metrics, out)


def _photo(width: int, height: int) -> Image.Image:
    """A smooth RGB photo-like image (gradients and waves: small as a JPEG even at 6000 px)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, 128 + 100 * np.sin(x / 37) * np.cos(y / 23)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_images_become_their_rgb_colour_and_its_grey(tmp_path, fmt):
    """Print workflows and some stock photos are CMYK (a JPEG from Photoshop stores it inverted)."""
    colour = (200, 60, 30)
    path = tmp_path / f"cmyk.{fmt.lower()}"
    path.write_bytes(_encode(Image.new("RGB", (16, 16), colour).convert("CMYK"), fmt))
    for channels, expected in ((3, colour), (1, (Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)),))):
        r = ingest.decode_one(str(path), None, None, ingest.Conversion(channels, 8, 10**7, 10**7))
        assert r[0] == "ok" and r[3][2] == "CMYK", r
        np.testing.assert_allclose(r[2].reshape(-1, channels).mean(0), expected, atol=3)


def test_a_6000_px_photo_is_decoded_at_reduced_scale_and_still_converted_faithfully(tmp_path):
    """A 6000x4000 JPEG used to be decoded in full (72 MB per worker) to become 28x28; libjpeg's DCT
    scaling decodes it at 1/8 (750x500) instead, and the result differs by a fraction of a grey level."""
    data = _encode(_photo(6000, 4000), "JPEG", quality=90)
    im = Image.open(io.BytesIO(data))
    drafted = ingest.convert_image(im, 3, 64)
    assert im.size == (750, 500), "decoded at full size"
    full = Image.open(io.BytesIO(data))
    full.load()
    reference = np.asarray(full.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(drafted - reference).mean() < 1.0

    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    r = ingest.decode_one(str(path), None, None, ingest.Conversion(3, 64, 10**8, 10**8))
    assert r[0] == "ok" and r[3][:3] == (6000, 4000, "RGB"), r[:2]
    np.testing.assert_array_equal(r[2], drafted)


def test_an_exif_rotated_photo_reduced_at_decode_is_turned_as_a_viewer_shows_it(tmp_path):
    """Orientation 6 (a phone held upright): stored landscape with the dark half on the left, shown
    portrait with the dark half on top."""
    stored = np.full((800, 1200, 3), 230, np.uint8)
    stored[:, :600] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "JPEG", exif=exif)
    pixels = ingest.convert_image(Image.open(io.BytesIO(data)), 1, 32)[..., 0].astype(float)
    assert pixels[:14].mean() < 60 and pixels[18:].mean() > 200, pixels.mean(1)
    viewer = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L").resize((32, 32), Image.BILINEAR)
    assert np.abs(pixels - np.asarray(viewer, dtype=float)).mean() < 2


def _mixed_modes() -> dict[str, bytes]:
    base = _blocks(1)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "a/grey.png": _encode(base.convert("L"), "PNG"),
        "a/colour.jpg": _encode(_blocks(2), "JPEG"),
        "a/alpha.png": _encode(_blocks(3).convert("RGBA"), "PNG"),
        "b/palette.gif": _encode(_blocks(4).convert("P"), "GIF"),
        "b/cmyk.jpg": _encode(_blocks(5).convert("CMYK"), "JPEG"),
        "b/grey16.png": _encode(grey16, "PNG"),
        "b/grey_alpha.png": _encode(_blocks(6).convert("LA"), "PNG"),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_colour_images_mixed_are_all_converted_to_the_configured_channels(tmp_path, channels):
    source = _write(tmp_path / "data", _mixed_modes())
    out = tmp_path / "out"
    metrics = _ingest(source, out, channels=channels)
    assert metrics["images"] == 7 and metrics["quarantined"] == 0
    images = np.load(out / "images.npy")
    assert images.shape == (7, 16, 16, channels)
    m = pd.read_parquet(out / "manifest.parquet").set_index("source_path")
    assert metrics["orig_modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "LA": 1, "P": 1, "RGB": 1, "RGBA": 1}
    card = _card(metrics, out)
    assert "Original image modes (each converted to the configured channels): CMYK 1, I;16 1, L 1" in card
    grey_made_colour = [m.loc[p, "index"] for p in ("a/grey.png", "b/grey16.png", "b/grey_alpha.png")]
    colour_warning = [w for w in metrics["warnings"] if "colour images converted to grey" in w]
    if channels == 3:
        rows = images[grey_made_colour].astype(int)
        assert (rows[..., 0] == rows[..., 1]).all() and (rows[..., 1] == rows[..., 2]).all()
        assert not colour_warning
    else:
        assert colour_warning == ["4 colour images converted to grey (ingest.channels is 1; 3 keeps colour)"]
        assert colour_warning[0] in card


def test_a_folder_with_one_class_is_ingested_with_a_warning_that_a_classifier_needs_two(tmp_path):
    source = _write(tmp_path / "data", {f"only cats/{i}.png": _encode(_blocks(i), "PNG") for i in range(4)})
    out = tmp_path / "out"
    metrics = _ingest(source, out, channels=3)
    assert metrics["images"] == 4 and metrics["classes"] == 1
    (warning,) = metrics["warnings"]
    assert warning.startswith("1 class(es) with train images ['only cats']: a classifier needs at least 2; "
                              "audit and finetune cannot run")
    assert f"## Warnings\n\n- {warning}" in _card(metrics, out)


def test_a_class_with_a_single_image_is_named_in_a_warning(tmp_path):
    files = {f"{split}/{c}/{i}.png": _encode(_blocks(100 * k + 10 * s + i), "PNG")
             for s, (split, counts) in enumerate((("train", (3, 1)), ("test", (2, 1))))
             for k, (c, n) in enumerate(zip(("cat", "dog"), counts, strict=True)) for i in range(n)}
    metrics = _ingest(_write(tmp_path / "data", files), tmp_path / "out", channels=3)
    assert metrics["images"] == 7
    assert metrics["warnings"] == [
        "1 class(es) with a single train image ['dog']: audit's cross-validation needs at least 2 per class",
        "1 class(es) with a single test image ['dog']: pretrain's evaluation needs at least 2 per class"]


def _no_usable_images(root: Path, case: str) -> tuple[Path, str]:
    """A source with no usable image, and what the error must say besides the source's path."""
    if case == "empty directory":
        root.mkdir()
        return root, "empty source directory"
    if case == "empty class directories":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
        return root, (r"empty dataset: no image files found \(imagefolder layout\): "
                      r"the class directories \['cat', 'dog'\] are empty")
    if case == "photos not in class directories":
        _write(root, {"IMG_0001.jpg": _encode(_blocks(1), "JPEG"), "IMG_0002.jpg": _encode(_blocks(2), "JPEG")})
        return root, "2 file\\(s\\) and no class directories: put each class's images in a directory named after"
    if case == "no image files":
        _write(root, {"cat/notes.txt": b"not an image\n", "dog/empty.jpg": b""})
        return root, (r"none of the 2 files could be used "
                      r"\(quarantined by reason: \{'empty': 1, 'not an image': 1\}\), "
                      r"e.g. dog/empty.jpg: empty: 0 bytes; cat/notes.txt: not an image: ")
    # a manifest whose paths are all missing (written relative to another directory)
    root.mkdir()
    pd.DataFrame({"path": ["photos/a.jpg", "photos/b.jpg"], "label": ["cat", "dog"]}).to_csv(
        root / "labels.csv", index=False)
    return root / "labels.csv", (r"none of the 2 files could be used \(quarantined by reason: \{'missing file': 2\}\), "
                                 rf"e.g. photos/a.jpg: missing file: {root}/photos/a.jpg: no such file")


@pytest.mark.parametrize("case", ["empty directory", "empty class directories", "photos not in class directories",
                                  "no image files", "manifest paths all missing"])
def test_a_source_without_a_usable_image_is_an_error_naming_the_source_and_the_problem(tmp_path, case):
    source, problem = _no_usable_images(tmp_path / "data", case)
    with pytest.raises(ValueError, match=problem) as err:
        _ingest(source, tmp_path / "out")
    assert str(err.value).startswith(f"{source}: ")


def test_listed_equals_kept_plus_quarantined_and_the_card_says_so(tmp_path):
    """A manifest with missing paths, an unreadable file and every image mode: each listed file is a row
    of manifest.parquet or of quarantine.parquet, and the dataset card states the sum."""
    root = _write(tmp_path / "data", {**_mixed_modes(), "b/broken.jpg": b"\xff\xd8\xff truncated"})
    paths = [*_mixed_modes(), "b/broken.jpg", "b/gone.jpg", "c/gone.png"]
    pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths]}).to_csv(root / "labels.csv", index=False)
    out = tmp_path / "out"
    metrics = _ingest(root / "labels.csv", out, channels=3)
    kept = pd.read_parquet(out / "manifest.parquet")["source_path"].tolist()
    refused = pd.read_parquet(out / "quarantine.parquet")["source_path"].tolist()
    assert sorted(kept + refused) == sorted(paths)
    assert (metrics["listed"], metrics["images"], metrics["quarantined"]) == (10, 7, 3)
    assert "10 files listed = 7 images kept + 3 quarantined" in _card(metrics, out)


def test_a_fifo_among_the_photos_is_quarantined_as_empty_instead_of_hanging_ingest(tmp_path):
    """Opening a FIFO waits for a writer forever; its size is 0, so it is refused before it is opened."""
    source = _write(tmp_path / "data", {f"cat/{i}.png": _encode(_blocks(i), "PNG") for i in range(2)})
    os.mkfifo(source / "cat/pipe.png")

    def hung(*_):
        raise TimeoutError("ingest waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        metrics = _ingest(source, tmp_path / "out", channels=3)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert metrics["images"] == 2 and metrics["quarantine"][ingest.EMPTY] == 1
