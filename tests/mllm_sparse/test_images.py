import numpy as np
import pytest
import torch
from PIL import Image

from mllm_sparse import ImageLoadError, load_image, preprocess
from mllm_sparse.images import denormalize

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "mode, size",
    [
        ("L", (40, 30)),
        ("RGBA", (33, 57)),
        ("P", (20, 20)),
        ("I;16", (16, 24)),
        ("RGB", (1, 1)),
        ("RGB", (4000, 1)),
        ("RGB", (1, 3000)),
        ("CMYK", (10, 12)),
    ],
)
def test_odd_images_become_normalised_squares(tmp_path, mode, size):
    image = Image.new(mode, size)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == size
    pixels = preprocess(loaded, 32, MEAN, STD)
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()


def test_preprocess_crops_the_centre_and_normalises():
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, 50:150] = 255  # the centre 100x100 square is white
    pixels = preprocess(Image.fromarray(array), 16, MEAN, STD, crop_pct=1.0)
    torch.testing.assert_close(pixels, torch.ones(3, 16, 16))
    back = denormalize(pixels, MEAN, STD)
    assert back.size == (16, 16) and np.asarray(back).min() == 255


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        load_image(tmp_path / "corrupt.jpg")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")


def test_decompression_bomb_is_refused_with_the_file_name(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageLoadError, match="huge.png.*too large"):
        load_image(tmp_path / "huge.png")


def test_draft_mode_keeps_big_jpegs_cheap(tmp_path):
    Image.new("RGB", (2048, 1536), "blue").save(tmp_path / "big.jpg")
    image = load_image(tmp_path / "big.jpg", draft_size=224)
    assert min(image.size) >= 224 and image.size[0] < 2048


def test_bad_crop_pct():
    with pytest.raises(ValueError, match="crop_pct"):
        preprocess(Image.new("RGB", (8, 8)), 8, MEAN, STD, crop_pct=0)


def gradient_16bit(shape=(48, 64)) -> np.ndarray:
    """Every 16-bit level band across the image: 0 at the top-left to 65535 at the bottom-right."""
    ramp = np.linspace(0, 65535, shape[0] * shape[1])
    return np.round(ramp).astype(np.uint16).reshape(shape)


def test_16_bit_grayscale_png_matches_its_8_bit_version(tmp_path):
    wide = gradient_16bit()
    Image.fromarray(wide).save(tmp_path / "g16.png")
    Image.fromarray(np.round(wide / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = np.asarray(load_image(tmp_path / "g16.png")).astype(int)
    expected = np.asarray(load_image(tmp_path / "g8.png")).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert (got == 255).mean() < 0.01  # clipped by PIL's own conversion, 99.6% would be white
    # an in-memory 16-bit image (a caller's PIL image) gets the same pixels through preprocess
    torch.testing.assert_close(
        preprocess(Image.open(tmp_path / "g16.png"), 32, MEAN, STD),
        preprocess(Image.open(tmp_path / "g8.png"), 32, MEAN, STD),
        atol=1 / 255 / 0.5 + 1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_grayscale_images_are_scaled_by_their_range(mode):
    from mllm_sparse.images import to_rgb

    wide = gradient_16bit().astype(np.int32 if mode == "I" else np.float32)
    if mode == "F":
        wide = wide / 65535  # a float image in [0, 1]
    got = np.asarray(to_rgb(Image.fromarray(wide))).astype(int)
    expected = np.round(gradient_16bit() / 257).astype(int)
    assert np.abs(got[..., 0] - expected).max() <= 1


def test_a_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "photo.png").mkdir()
    with pytest.raises(ImageLoadError, match="photo.png is a directory, not an image"):
        load_image(tmp_path / "photo.png")


@pytest.mark.parametrize("size", [(60, 100), (100, 60)])  # (width, height): portrait and landscape
def test_preprocess_crop_takes_the_centred_square_of_a_non_square_image(size):
    """crop_pct 0.5 of the shorter side 60: a 30-px square at left (W − 30) // 2, top (H − 30) // 2, no resampling."""
    width, height = size
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    array = np.stack([rows, cols, (rows + cols) % 7], axis=-1).astype(np.uint8)  # every pixel says where it was
    pixels = preprocess(Image.fromarray(array), 30, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), crop_pct=0.5)
    left, top = (width - 30) // 2, (height - 30) // 2
    expected = torch.from_numpy(array[top : top + 30, left : left + 30].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
