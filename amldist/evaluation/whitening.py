"""Learned whitening (Lw) of a network under test: stored in its file, cached beside it, or learned.

Lw is learned in the database network's space (the teacher's for asymmetric testing) on a training
set's whitening pairs and applied to queries and database alike. It comes from the network file's
meta['Lw'] (cirtorch's {name: {'ss'|'ms': {'m', 'P'}}}), else from a cached file beside the network
(`<stem>.<name>-<size>.whiten[-ms].pt`, used only if learned for the same network file content), else
it is learned and cached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from amldist import whiten
from amldist.datasets import formats, layout
from amldist.errors import UserError, require
from amldist.evaluation.descriptors import DescriptorCache, LoadedNet
from amldist.feature_store import file_sha256

log = logging.getLogger(__name__)


def whitening_cache_path(network_path: Path, name: str, image_size: int, multiscale: bool) -> Path:
    stem = network_path.name
    for suffix in (".tar", ".pth", ".pt"):
        stem = stem.removesuffix(suffix)
    return network_path.with_name(f"{stem}.{name}-{image_size}.whiten{'-ms' if multiscale else ''}.pt")


def whitening_for(network: LoadedNet, name: str, cache: DescriptorCache) -> whiten.Whitening:
    """Lw of `network` on `name`: from meta['Lw'], else a matching cached file, else learned (and cached)."""
    settings = cache.settings
    multiscale = len(settings.scales) > 1
    stored = _stored_whitening(network, name, multiscale)
    if stored is not None:
        log.info("%s: whitening %s from the network file", network.role, name)
        return stored
    path = whitening_cache_path(network.path, name, settings.image_size, multiscale)
    # The cache sits beside the network under a name that survives retraining, so it is keyed to the
    # network file's content: a replaced network must not reuse the Lw learned for the old one.
    provenance = {"whitening": name, "image_size": settings.image_size, "scales": list(settings.scales),
                  "network_sha256": file_sha256(network.path)}
    cached = _cached_whitening(path, provenance, network)
    if cached is not None:
        return cached
    pairs = formats.read_whiten_db(layout.whiten_db_path(settings.data_root, name))
    X = cache.descriptors(network, name, "whiten", len(pairs.cids))  # (N, D)
    learned = whiten.learn_whitening(X, pairs.qidxs, pairs.pidxs)
    learned.meta.update(provenance)
    try:
        whiten.save_whitening(path, learned)
    except OSError as err:
        log.warning("could not cache the whitening at %s: %s", path, err)
    return learned


def _stored_whitening(network: LoadedNet, name: str, multiscale: bool) -> whiten.Whitening | None:
    """meta['Lw'][name]['ss'|'ms'] of the network file, or None; a damaged entry is a one-line error."""
    try:
        entry = _lw_entry(network.net.meta.extra.get("Lw"), name, "ms" if multiscale else "ss")
        if entry is None:
            return None
        lw = whiten.whitening_from_dict(entry)
        require(lw.P.shape[1] == network.dim,
                f"meta['Lw'] expects {lw.P.shape[1]}-D descriptors, the network gives {network.dim}")
    except UserError as err:
        raise UserError(f"damaged network file {network.path}: {err}") from None
    return lw


def _lw_entry(lw: Any, name: str, scale_key: str) -> Any:
    """Walk cirtorch's {name: {'ss'|'ms': {'m', 'P'}}} layout, refusing any level that is not a dict."""
    if lw is None:
        return None
    require(isinstance(lw, dict), f"meta['Lw'] is a {type(lw).__name__}, not a dict")
    per_name = lw.get(name)
    require(per_name is None or isinstance(per_name, dict),
            f"meta['Lw'][{name!r}] is a {type(per_name).__name__}, not a dict")
    return None if per_name is None else per_name.get(scale_key)


def _cached_whitening(path: Path, provenance: dict[str, Any], network: LoadedNet) -> whiten.Whitening | None:
    """The cached Lw when it was learned with these settings for this very network file, else None.
    The file is only a cache: a damaged one is learned again (with a warning), not an error."""
    if not path.is_file():
        return None
    try:
        cached = whiten.load_whitening(path)
    except UserError as err:
        log.warning("%s: ignoring the whitening cache, learning again (%s)", network.role, err)
        return None
    if all(cached.meta.get(k) == v for k, v in provenance.items()) and cached.P.shape[1] == network.dim:
        log.info("%s: whitening from %s", network.role, path)
        return cached
    log.info("%s: %s was learned with other settings or another network file; learning again",
             network.role, path)
    return None
