import sys
from amldist.config import preset_dict, apply_overrides, parse_set, config_from_dict
from amldist.training.paths import default_store_dir, shard_root
from amldist.teacher_features import compute_features
cfg, teacher = sys.argv[1], sys.argv[2]
config = config_from_dict(apply_overrides(preset_dict(cfg), [parse_set(f"model.teacher={teacher}")]))
out = default_store_dir(config); print(out)
compute_features(teacher, shard_root(config) / "train", out, image_size=config.data.image_size)
