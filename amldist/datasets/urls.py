"""Public URLs of the real datasets (as cirtorch, revisitop and budnikm/aml fetch them).

Every URL is `<host prefix><path>`; `rebase` swaps the scheme + host for another base so a mirror
(or a test's loopback server) can serve the same paths.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from amldist.datasets import layout
from amldist.errors import UserError

CIRTORCH_DATA = "http://cmp.felk.cvut.cz/cnnimageretrieval/data"
REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
REVISITOP1M_ARCHIVES = 100

# Face-blurred image archives (June 2022), used by current cirtorch and revisitop.
TEST_IMAGE_ARCHIVES = {
    "oxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",),
    "paris6k": ("https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
                "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz"),
}
# The original archives budnikm/aml downloads (`--legacy-archives`).
LEGACY_TEST_IMAGE_ARCHIVES = {
    "oxford5k": ("http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz",),
    "paris6k": ("http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz",
                "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2.tgz"),
}

# Names `amldist data download` accepts. Both SfM names fetch the same files (cirtorch's download_train).
DOWNLOADABLE = layout.ALL_DATASETS


def sfm_images_url() -> str:
    return f"{CIRTORCH_DATA}/train/ims/ims.tar.gz"


def sfm_db_url(name: str) -> str:
    return f"{CIRTORCH_DATA}/train/dbs/{name}.pkl"


def sfm_whiten_url(name: str) -> str:
    return f"{CIRTORCH_DATA}/train/dbs/{name}-whiten.pkl"


def test_image_archive_urls(name: str, legacy: bool = False) -> tuple[str, ...]:
    table = LEGACY_TEST_IMAGE_ARCHIVES if legacy else TEST_IMAGE_ARCHIVES
    return table[layout.test_images_owner(name)]


def gnd_url(name: str) -> str:
    return f"{CIRTORCH_DATA}/test/{name}/gnd_{name}.pkl"


def revisitop1m_archive_urls() -> tuple[str, ...]:
    return tuple(f"{REVISITOP1M}/jpg/revisitop1m.{i}.tar.gz" for i in range(1, REVISITOP1M_ARCHIVES + 1))


def revisitop1m_list_url() -> str:
    return f"{REVISITOP1M}/revisitop1m.txt"


def dataset_urls(name: str, legacy: bool = False) -> tuple[str, ...]:
    """Every URL `amldist data download NAME` may fetch, small files first."""
    kind = layout.dataset_kind(name)
    if kind == "train":
        return (sfm_db_url("retrieval-SfM-120k"), sfm_whiten_url("retrieval-SfM-120k"),
                sfm_whiten_url("retrieval-SfM-30k"), sfm_images_url())
    if kind == "test":
        return (gnd_url(name),) + test_image_archive_urls(name, legacy)
    return (revisitop1m_list_url(),) + revisitop1m_archive_urls()


def check_base_url(base: str) -> str:
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - parses the port: 'host:x' and '[::1' fail here, not at the first request
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--base-url must look like http://host[:port][/prefix], got {base!r}")
    return base.rstrip("/")


def rebase(url: str, base: str | None) -> str:
    """`url` with its scheme and host replaced by `base` (None keeps the public URL)."""
    if base is None:
        return url
    parts = urlsplit(url)
    return check_base_url(base) + parts.path
