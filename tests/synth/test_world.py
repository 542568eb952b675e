import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from mllm_sparse.synth import COLORS, SHAPES, WorldSettings, class_names, generate_world, make_scene
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse.synth.generate import SynthSettings, run
from mllm_sparse.synth.png import encode_png
from mllm_sparse.synth.world import DIFFICULTIES
from mllm_sparse_recipes.commands import synth as synth_command
from mllm_sparse_recipes.commands.synth import main as synth_main


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "world.json"):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    generate_world(tmp_path / "a", num_images=70, image_size=48, seed=3, workers=1, progress=False)
    generate_world(tmp_path / "b", num_images=70, image_size=48, seed=3, workers=2, progress=False)
    generate_world(tmp_path / "c", num_images=70, image_size=48, seed=4, workers=1, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_scenes_follow_the_rules():
    settings = WorldSettings.for_difficulty("default")
    counts = []
    for index in range(200):
        scene, image = make_scene(settings, 0, index, 96)
        objs = scene.objects
        counts.append(len(objs))
        assert 1 <= len(objs) <= 8 and image.size == (96, 96)
        assert all(o.shape in SHAPES and o.color in COLORS for o in objs)
        # The principal object is clearly the largest, and nothing overlaps or leaves the image.
        assert all(objs[0].area >= o.area * settings.principal_margin * 0.999 for o in objs[1:])
        for i, a in enumerate(objs):
            assert a.radius <= a.cx <= 1 - a.radius and a.radius <= a.cy <= 1 - a.radius
            for b in objs[i + 1 :]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.radius + b.radius
    assert max(counts) >= 7 and min(counts) == 1
    sizes = [o.size for i in range(200) for o in make_scene(settings, 0, i, 96)[0].objects[1:]]
    assert sizes.count("small") > sizes.count("medium")  # small objects are common


def test_rendered_objects_have_their_ground_truth_colour():
    settings = WorldSettings.for_difficulty("default")
    palette = np.array(list(COLORS.values()), dtype=float)
    names = list(COLORS)
    checked = 0
    for index in range(60):
        scene, image = make_scene(settings, 1, index, 224)
        pixels = np.asarray(image, dtype=float)
        for obj in scene.objects:
            # A ring's centre is its hole: look in the middle of its band.
            dx = 0.75 * obj.radius if obj.shape == "ring" else 0.0
            rgb = pixels[int(obj.cy * 224), int((obj.cx + dx) * 224)]
            assert names[int(np.argmin(((palette - rgb) ** 2).sum(1)))] == obj.color
            checked += 1
    assert checked > 150


def test_difficulty_knobs_move_the_scenes():
    stats = {}
    for difficulty in ("easy", "default", "hard"):
        settings = WorldSettings.for_difficulty(difficulty)
        scenes = [make_scene(settings, 0, i, 64)[0] for i in range(150)]
        objects = [o for s in scenes for o in s.objects]
        stats[difficulty] = (np.mean([len(s.objects) for s in scenes]), np.mean([o.size == "small" for o in objects]))
    assert stats["easy"][0] < stats["default"][0] < stats["hard"][0]
    assert stats["easy"][1] < stats["default"][1] < stats["hard"][1]
    with pytest.raises(ValueError, match="difficulty must be one of"):
        WorldSettings.for_difficulty("nightmare")


def test_files_and_labels(small_world):
    world = json.loads((small_world / "world.json").read_text())
    assert world["num_images"] == 40 and world["splits"]["train"]["images"] == 32
    labels = json.loads((small_world / "labels.json").read_text())
    assert labels["classes"] == class_names() and len(labels["classes"]) == 48
    # Zero-shot prompts speak like the principal-object caption: "a large {}." in the default world.
    assert labels["templates"] == ["a large {}."]
    scenes = {json.loads(line)["image"]: json.loads(line) for line in (small_world / "scenes.jsonl").open()}
    for row in labels["images"]:
        principal = scenes[row["image"]]["objects"][0]
        assert labels["classes"][row["label"]] == f"{principal['color']} {principal['shape']}"
        assert (small_world / row["image"]).is_file()
    captions = [json.loads(line) for line in (small_world / "captions.jsonl").open()]
    assert len(captions) == 40
    for row in captions:
        principal = scenes[row["image"]]["objects"][0]
        assert row["caption"].startswith(f"a {principal['size']} {principal['color']} {principal['shape']}")
        assert row["captions"][-1] == labels["templates"][0].format(f"{principal['color']} {principal['shape']}")


def test_png_writer_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.float32))


def test_cli_writes_a_world_and_refuses_bad_arguments(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "w"), "--num-images", "12", "--image-size", "32", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"]["images"] == 2
    with pytest.raises(ValueError, match="not empty"):
        synth_main(["--out", str(tmp_path / "w"), "--num-images", "12"])
    with pytest.raises(ValueError, match="num_images must be >= 10"):
        synth_main(["--out", str(tmp_path / "x"), "--num-images", "3"])
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        synth_main(["--out", str(tmp_path / "y"), "--image-size", "8"])
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path / "z"), "--difficulty", "nightmare"])


def test_the_typed_call_writes_what_the_command_writes(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path / "cli"), "--num-images", "12", "--image-size", "32", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    world = run(SynthSettings(out=tmp_path / "typed", num_images=12, image_size=32, seed=2), progress=False)
    assert world["splits"] == printed["splits"] and world["images_per_second"] > 0
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "typed")
    with pytest.raises(ValueError, match="not empty"):
        run(SynthSettings(out=tmp_path / "typed", num_images=12, image_size=32))
    run(SynthSettings(out=tmp_path / "typed", num_images=12, image_size=32, overwrite=True), progress=False)


def test_the_command_offers_the_worlds_difficulties():
    assert synth_command.DIFFICULTIES == DIFFICULTIES


def test_reading_a_broken_world_names_the_file(tmp_path, small_world):
    with pytest.raises(FileNotFoundError, match="World folder not found"):
        SyntheticWorld(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "world.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="labels.json"):
        SyntheticWorld(broken)
    (broken / "labels.json").write_text('{"classes": [')
    with pytest.raises(ValueError, match="Malformed JSON in .*labels.json"):
        SyntheticWorld(broken)
    world = SyntheticWorld(small_world)
    images = world.captioned_images("val", 32, progress=False)
    assert images.images.shape == (4, 3, 32, 32) and len(images.captions) == 4
    with pytest.raises(ValueError, match="no images in split 'dev'"):
        world.records("dev")


def test_objects_have_a_dark_outline_whatever_their_colour():
    from PIL import ImageDraw

    from mllm_sparse.synth.world import OUTLINE_COLOR, SceneObject, _draw_shape

    for shape in SHAPES:
        image = Image.new("RGB", (224, 224), (200, 200, 200))
        _draw_shape(ImageDraw.Draw(image), SceneObject(shape, "yellow", "large", 0.5, 0.5, 0.2), 224, (235, 215, 40))
        pixels = np.asarray(image)
        inside = 112 - (34 if shape == "ring" else 0)  # a ring's colour is in its band, around the hole
        assert tuple(pixels[112, inside]) == (235, 215, 40)
        # Walking left from inside, the fill meets the outline before the background.
        row = [tuple(p) for p in pixels[112, : inside + 1][::-1]]
        first_other = next(p for p in row if p != (235, 215, 40))
        assert first_other == OUTLINE_COLOR, shape
    ring = Image.new("RGB", (224, 224), (200, 200, 200))
    _draw_shape(ImageDraw.Draw(ring), SceneObject("ring", "yellow", "large", 0.5, 0.5, 0.2), 224, (235, 215, 40))
    assert tuple(np.asarray(ring)[112, 112]) == (200, 200, 200)  # the hole shows the background
