"""Ray for a library call that spreads its work over Ray tasks: joined if the caller started it, else started
here (on the cluster RAY_ADDRESS names, or a local instance), and then stopped by that call again."""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray(num_cpus: int) -> bool:
    """Start Ray unless it is running; returns True when this call started it (and so should stop it).
    A local instance gets `num_cpus`; a cluster named by RAY_ADDRESS brings its own."""
    if ray.is_initialized():
        return False
    ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus, include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    return True
