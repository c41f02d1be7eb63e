"""A network through the test protocol: descriptors, learned whitening and mAP in each testing mode.

    settings = EvalSettings(data_root, datasets=("roxford5k", "rparis6k"), whitening="retrieval-SfM-120k")
    results = evaluate_networks(student_path, teacher_path, ["sym", "teacher", "asym"], settings)

`amldist eval` and the demo call these. Ranking and the metrics themselves are `amldist.evaluate`'s;
Lw's mathematics is `amldist.whiten`'s.
"""

from amldist.evaluation.descriptors import DescriptorCache, EvalSettings, LoadedNet, load_net
from amldist.evaluation.modes import MODES, evaluate_mode, evaluate_networks, testing_modes
from amldist.evaluation.whitening import whitening_cache_path, whitening_for

__all__ = ["MODES", "DescriptorCache", "EvalSettings", "LoadedNet", "evaluate_mode", "evaluate_networks",
           "load_net", "testing_modes", "whitening_cache_path", "whitening_for"]
