"""imagefolder: ImageNet's train layout, ADM's centre crop, and unreadable files reported, never skipped silently."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from igdit.config import ConfigError
from igdit.data import ImageFolderSource, build_dataset, center_crop_arr, load_meta, load_source
from igdit.cli import main as igdit


def data_main(argv):
    return igdit(["data", *argv])


def test_adm_crop_halves_with_box_then_crops_the_centre():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    # 64x64 made of constant 4x4 blocks: two BOX halvings (64 -> 32 -> 16; 16 < 2 x 16 stops) are exact and
    # the resize to the same size is the identity, so the crop is the small image itself.
    big = Image.fromarray(small.repeat(4, axis=0).repeat(4, axis=1))
    assert np.array_equal(center_crop_arr(big, 16), small)

    # The short side already equals the target: no resize, only the centred crop (offsets rounded down).
    wide = rng.integers(0, 256, size=(16, 41, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(wide), 16), wide[:, 12:28])

    # Short side 24 < 2 x 16: no halving; BICUBIC resize of 40x24 to round(26.67) = 27 x 16; crop columns 5..21.
    image = Image.fromarray(rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8))
    expected = np.array(image.resize((27, 16), resample=Image.BICUBIC))[:, 5:21]
    assert np.array_equal(center_crop_arr(image, 16), expected)


def test_imagefolder_lists_classes_by_sorted_subfolder_and_reads_rgb_crops(image_folder):
    source = load_source(f"imagefolder:{image_folder}", resolution=16)
    assert isinstance(source, ImageFolderSource)
    assert source.class_names == ["cat", "dog", "owl"] and len(source) == 15
    assert source.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert source.paths[0] == "cat/img0.JPEG" and source.image_shape == (3, 16, 16)
    image = source.read(1)  # cat/img1.png, 24x40 (w x h): short side 24
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    with Image.open(image_folder / "cat/img1.png") as pil:
        expected = center_crop_arr(pil.convert("RGB"), 16)
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    # a grey image is read as RGB
    Image.fromarray(np.full((20, 20), 77, np.uint8)).save(image_folder / "owl" / "grey.png")
    grey = load_source(f"imagefolder:{image_folder}", resolution=16)
    assert grey.read(list(grey.paths).index("owl/grey.png")).shape == (3, 16, 16)


@pytest.mark.parametrize("make,message", [
    (lambda root: root.mkdir(), "holds no images"),
    (lambda root: (root / "cat").mkdir(parents=True), "class folder 'cat' with no images"),
    (lambda root: None, "is not a folder"),
])
def test_a_folder_without_images_is_refused_with_one_line(make, message, tmp_path):
    root = tmp_path / "x"
    make(root)
    with pytest.raises(ConfigError, match=f"^source: .*{message}") as err:
        build_dataset(f"imagefolder:{root}", tmp_path / "out", resolution=16, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_imagefolder_needs_a_resolution(image_folder, tmp_path, capsys):
    assert data_main(["build", f"imagefolder:{image_folder}", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: resolution: None is not allowed; imagefolder needs --resolution")


def test_corrupt_images_are_reported_counted_and_skipped(image_folder, tmp_path, capsys):
    (image_folder / "dog" / "garbage.JPEG").write_bytes(b"this is not a jpeg")
    whole = (image_folder / "owl" / "img0.JPEG").read_bytes()
    (image_folder / "owl" / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped unreadable image .*(garbage|truncated).JPEG") as caught:
        assert data_main(["build", f"imagefolder:{image_folder}", str(out), "--resolution", "16",
                          "--val_fraction", "0.3", "--no_progress"]) == 0
    warned = [w for w in (str(c.message) for c in caught) if "skipped unreadable image" in w]
    # one line per shard that skipped files: its first file, then how many more (2 files, in 1 or 2 shards)
    assert sum(1 + int(re.search(r"and (\d+) more|$", w).group(1) or 0) for w in warned) == 2
    meta = load_meta(out)
    skipped = meta["skipped_images"]
    assert skipped["count"] == 2
    assert sorted(s["image"] for s in skipped["first"]) == sorted(
        str(p) for p in (image_folder / "dog" / "garbage.JPEG", image_folder / "owl" / "truncated.JPEG"))
    assert meta["num_images"]["train"] + meta["num_images"]["val"] == 15  # 17 files, 2 unreadable
    assert meta["num_samples"] == meta["num_images"]
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().out
    records = [json.loads(p.read_text()) for p in sorted((out / ".build").glob("*-*.json"))]
    assert sum(len(r["skipped"]) for r in records) == 2
