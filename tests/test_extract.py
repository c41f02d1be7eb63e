"""Extraction: cirtorch's resize and bbx-crop rules, batched == one-at-a-time, multi-scale combination,
image files and shards giving the same inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amldist import extract
from amldist.datasets import formats
from amldist.nets import create_net

IMAGE_SIZE = 48


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_net("small_cnn", pooling="gem", pretrained=False).eval()


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        # Smooth random content (upsampled noise) so resizing and JPEG keep it recognisable.
        small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        path = folder / f"im{i:03d}.jpg"
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=95)
        paths.append(path)
    return paths


SIZES = [(64, 48), (48, 64), (64, 48), (60, 45), (64, 40), (30, 20), (64, 48), (50, 64)]


@pytest.mark.parametrize("size", [(100, 50), (50, 100), (33, 77), (1024, 768), (10, 10), (640, 479)])
@pytest.mark.parametrize("max_side", [48, 47.6, 362, 1024, 7])
def test_thumbnail_size_matches_pil(size, max_side):
    img = Image.new("RGB", size)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    assert extract.thumbnail_size(*size, max_side) == img.size


def test_query_crop_keeps_the_full_image_scale(tmp_path):
    # 200 x 100 image: left half red, right half blue; the bbx covers x 110..190, y 10..50 (all blue).
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100, 0] = 255
    pixels[:, 100:, 2] = 255
    path = tmp_path / "q.png"
    Image.fromarray(pixels).save(path)
    source = extract.FileSource([path], [(110.0, 10.0, 190.0, 50.0)])
    # cirtorch's rule: max side = image_size * max(crop) / max(full) = 100 * 80 / 200 = 40 -> 40 x 20.
    img = extract.prepare_image(source, 0, image_size=100)
    assert img.size == (40, 20)
    assert extract.input_size(source, 0, 100) == (20, 40)
    assert np.asarray(img)[..., 2].min() > 200 and np.asarray(img)[..., 0].max() < 50
    # The database version of the same file is just thumbnailed: 100 x 50.
    assert extract.prepare_image(extract.FileSource([path]), 0, image_size=100).size == (100, 50)


class _HalfSizeSource:
    """A source whose stored image is the original at half size (as a shard stores it)."""

    def __init__(self, path, bbx):
        self.full = Image.open(path).convert("RGB")
        self.stored = self.full.resize((self.full.width // 2, self.full.height // 2),
                                       Image.Resampling.LANCZOS)
        self._bbx = bbx

    def __len__(self):
        return 1

    def size(self, i):
        return self.stored.size

    def original_size(self, i):
        return self.full.size

    def bbx(self, i):
        return self._bbx

    def load(self, i):
        return self.stored.copy()


def test_bbx_is_rescaled_to_a_pre_resized_image(tmp_path):
    path = _write_images(tmp_path, [(200, 120)])[0]
    bbx = (40.0, 20.0, 160.0, 100.0)  # 120 x 80 in original pixels
    stored = _HalfSizeSource(path, bbx)
    # Crop of the stored image: (20, 10, 80, 50) -> 60 x 40; max side = 60 * 120 / 200 = 36 -> 36 x 24.
    assert extract.crop_box(bbx, stored.size(0), stored.original_size(0)) == (20, 10, 80, 50)
    assert extract.prepare_image(stored, 0, image_size=60).size == (36, 24)
    assert extract.prepare_image(extract.FileSource([path], [bbx]), 0, image_size=60).size == (36, 24)


def _one_at_a_time(net, source, image_size):
    """The reference loop: each prepared image alone through the network, normalised like cirtorch."""
    mean = torch.tensor(net.meta.mean).view(3, 1, 1)
    std = torch.tensor(net.meta.std).view(3, 1, 1)
    rows = []
    with torch.no_grad():
        for i in range(len(source)):
            x = torch.from_numpy(np.asarray(extract.prepare_image(source, i, image_size), np.float32) / 255)
            rows.append(net(((x.permute(2, 0, 1) - mean) / std)[None])[0])
    return torch.stack(rows).numpy()


def test_batched_equals_one_at_a_time(tmp_path, net):
    source = extract.FileSource(_write_images(tmp_path, SIZES))
    reference = _one_at_a_time(net, source, IMAGE_SIZE)
    single = extract.embed(net, source, image_size=IMAGE_SIZE, batch_size=1)
    batched = extract.embed(net, source, image_size=IMAGE_SIZE, batch_size=4, max_pad_frac=0.5)
    assert batched.shape == (len(SIZES), net.meta.outputdim) and batched.dtype == np.float32
    np.testing.assert_allclose(single, reference, atol=1e-5)
    np.testing.assert_allclose(batched, reference, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_multiscale_combination(tmp_path, net):
    source = extract.FileSource(_write_images(tmp_path, SIZES[:3], seed=1))
    single = extract.embed(net, source, image_size=IMAGE_SIZE)
    # scales=[1]: plain single-scale descriptors; twice the same scale combines to the same vector.
    np.testing.assert_allclose(extract.embed(net, source, image_size=IMAGE_SIZE, scales=[1.0]), single)
    np.testing.assert_allclose(extract.embed(net, source, image_size=IMAGE_SIZE, scales=[1.0, 1.0]), single,
                               atol=1e-5)
    # [1, 1/2]: (mean of v_s^p)^(1/p), L2-normalised, with p = GeM's p, worked out here image by image.
    p = net.pool.p.item()
    mean, std = torch.tensor(net.meta.mean).view(3, 1, 1), torch.tensor(net.meta.std).view(3, 1, 1)
    expected = []
    with torch.no_grad():
        for i in range(len(source)):
            x = torch.from_numpy(np.asarray(extract.prepare_image(source, i, IMAGE_SIZE), np.float32) / 255)
            x = ((x.permute(2, 0, 1) - mean) / std)[None]
            half = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            v = ((net(x) ** p + net(half) ** p) / 2) ** (1 / p)
            expected.append((v / v.norm())[0])
    ms = extract.embed(net, source, image_size=IMAGE_SIZE, scales=[1.0, 0.5], batch_size=3, max_pad_frac=0.5)
    np.testing.assert_allclose(ms, torch.stack(expected).numpy(), atol=1e-4)
    assert not np.allclose(ms, single, atol=1e-3)


def test_multiscale_power_is_gem_p_only_for_gem_and_several_scales(net):
    assert extract.multiscale_power(net, [1.0]) == 1.0
    assert extract.multiscale_power(net, [1.0, 0.5]) == pytest.approx(net.pool.p.item())
    assert extract.multiscale_power(create_net("small_cnn", pooling="mac", pretrained=False), [1, 0.5]) == 1.0


def test_dataloader_workers_give_the_same_result(tmp_path, net):
    source = extract.FileSource(_write_images(tmp_path, SIZES[:4], seed=2))
    np.testing.assert_allclose(extract.embed(net, source, image_size=IMAGE_SIZE, num_workers=2),
                               extract.embed(net, source, image_size=IMAGE_SIZE), atol=1e-6)


def test_shards_and_files_give_the_same_descriptors(tmp_path, net):
    from amldist.shards import shard_dataset

    root = tmp_path / "data"
    jpg = root / "test" / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    paths = _write_images(jpg, [(64, 48), (48, 64), (60, 40)], seed=3)
    names = [p.stem for p in paths]
    gnd = [{"bbx": np.array([4.0, 6.0, 40.0, 30.0]), "easy": np.array([1]), "hard": np.array([], np.int64),
            "junk": np.array([], np.int64)}]
    formats.write_gnd(root / "test" / "roxford5k" / "gnd_roxford5k.pkl",
                      formats.GroundTruth(imlist=names[1:], qimlist=names[:1], gnd=gnd))
    out = shard_dataset(root, "roxford5k", image_size=IMAGE_SIZE, workers=1)
    assert set(out) == {"db", "query"}
    split_dir = root / "shards" / f"roxford5k-{IMAGE_SIZE}"
    records = formats.list_images(root, "roxford5k")
    for split, crop in (("db", False), ("query", True)):
        from_shards = extract.ShardSource(split_dir / split, crop_to_bbx=crop,
                                          expected_count=len(records[split]))
        from_files = extract.FileSource.from_records(records[split])
        assert [extract.input_size(from_shards, i, IMAGE_SIZE) for i in range(len(from_shards))] == \
               [extract.input_size(from_files, i, IMAGE_SIZE) for i in range(len(from_files))]
        # Same images up to one more JPEG round trip.
        np.testing.assert_allclose(extract.embed(net, from_shards, image_size=IMAGE_SIZE),
                                   extract.embed(net, from_files, image_size=IMAGE_SIZE), atol=0.05)
    assert extract.input_size(extract.ShardSource(split_dir / "query", crop_to_bbx=True), 0, IMAGE_SIZE) \
        == (18, 27)


def test_empty_source_and_bad_scales(net):
    assert extract.embed(net, extract.FileSource([]), image_size=IMAGE_SIZE).shape == (0, net.meta.outputdim)
    from amldist.errors import UserError

    with pytest.raises(UserError):
        extract.embed(net, extract.FileSource(["x.jpg"]), scales=[0.0])


@pytest.mark.slow
def test_ray_workers_give_the_same_result_as_one_process(tmp_path, net):
    ray = pytest.importorskip("ray")
    from amldist import distributed_extract

    source = extract.FileSource(_write_images(tmp_path, SIZES, seed=4))
    local = extract.embed(net, source, image_size=IMAGE_SIZE, batch_size=4)
    try:
        spread = distributed_extract.embed_distributed(net, source, num_workers=2, image_size=IMAGE_SIZE,
                                                       batch_size=4)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(spread, local, atol=1e-5)
    chunks = distributed_extract.shape_ordered_chunks([(2, 1), (1, 1), (2, 1), (1, 5)], 3)
    assert [list(c) for c in chunks] == [[1, 3], [0], [2]]


def test_degenerate_boxes_still_give_an_image(tmp_path):
    path = _write_images(tmp_path, [(64, 48)])[0]
    source = extract.FileSource([path], [(10.2, 10.4, 10.3, 10.4)])  # rounds to an empty box
    img = extract.prepare_image(source, 0, image_size=32)
    assert img.size == (1, 1) and extract.input_size(source, 0, 32) == (1, 1)
    assert extract.thumbnail_size(640, 480, 0.4) == (1, 1)
