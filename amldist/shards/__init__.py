"""WebDataset shards of a dataset: writer, manifest, streaming and by-index reading.

Layout: `OUT/<split>/<split>-%06d.tar` with one sample per image (key `%08d` of its dataset index,
members `jpg` and `json`), `OUT/<split>/index.npy` (index → shard, member offsets and sizes) and
`OUT/<split>/manifest.json`, written last. OUT defaults to `ROOT/shards/<dataset>-<image_size>/`.

    manifests = shard_dataset(root, "roxford5k")            # idempotent; resumes after a kill
    reader = ShardReader(out / "db"); reader.read_image(12)  # one pread per member
    for index, image, meta in stream_samples(out / "db", shuffle=1000, epoch=3): ...
"""

from amldist.shards.manifest import (
    DEFAULT_QUALITY,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_COUNT,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    default_image_size,
    find_split_dirs,
    read_manifest,
)
from amldist.shards.read import CorruptSampleError, ShardReader, decode_jpeg, load_tensor, stream_samples
from amldist.shards.write import shard_dataset

__all__ = [
    "DEFAULT_QUALITY", "DEFAULT_SHARD_BYTES", "DEFAULT_SHARD_COUNT", "FORMAT_VERSION", "INDEX_COLUMNS",
    "CorruptSampleError", "ShardReader", "decode_jpeg", "default_image_size", "find_split_dirs",
    "load_tensor", "read_manifest", "shard_dataset", "stream_samples",
]
