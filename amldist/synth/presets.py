"""Dataset sizes of the synthetic landmark generator, one named preset each.

Every count is per dataset. A test set has `query_landmarks * queries_per_landmark` queries
(70 for the public presets, like rOxford5k/rParis6k); its database holds, per query landmark,
`db_easy + db_hard + db_junk` views, plus views of look-alike family members and of unrelated
landmarks (negatives).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from amldist.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    image_max_side: int  # longest side of most originals (some views are a little smaller)
    train_landmarks: int
    train_views: int  # views per training landmark (SfM cluster size)
    val_landmarks: int
    val_views: int
    pairs_per_image: int  # q/p pairs drawn with each image as query (the real SfM-120k has ~2)
    query_landmarks: int  # per test set
    queries_per_landmark: int
    db_easy: int  # database views per query landmark, by ground-truth class
    db_hard: int
    db_junk: int
    lookalike_views: int  # views of each look-alike of a query landmark (hard negatives)
    other_landmarks: int  # unrelated landmarks in each test database
    other_views: int
    distractors: int  # images in the revisitop1m-style distractor set

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    # For the test-suite and smoke runs only: tiny images, a handful of landmarks.
    "micro": Preset("micro", image_max_side=128, train_landmarks=6, train_views=4, val_landmarks=2,
                    val_views=3, pairs_per_image=2, query_landmarks=3, queries_per_landmark=2,
                    db_easy=2, db_hard=2, db_junk=1, lookalike_views=2, other_landmarks=2, other_views=2,
                    distractors=8),
    "tiny": Preset("tiny", image_max_side=512, train_landmarks=48, train_views=12, val_landmarks=8,
                   val_views=10, pairs_per_image=2, query_landmarks=14, queries_per_landmark=5,
                   db_easy=6, db_hard=5, db_junk=3, lookalike_views=6, other_landmarks=20, other_views=4,
                   distractors=200),
    # The pretrained demo's (`make demo`): test sets of tiny's size, more landmarks with fewer views each,
    # so that the whitening set holds more landmarks than the demo's d=128 has dimensions
    # (docs/TRAINING.md, "The pretrained presets") and the validation split has 16 of them.
    "lite": Preset("lite", image_max_side=512, train_landmarks=128, train_views=8, val_landmarks=16,
                   val_views=8, pairs_per_image=2, query_landmarks=14, queries_per_landmark=5,
                   db_easy=6, db_hard=5, db_junk=3, lookalike_views=6, other_landmarks=20, other_views=4,
                   distractors=200),
    "small": Preset("small", image_max_side=1024, train_landmarks=250, train_views=12, val_landmarks=30,
                    val_views=10, pairs_per_image=2, query_landmarks=14, queries_per_landmark=5,
                    db_easy=14, db_hard=12, db_junk=6, lookalike_views=10, other_landmarks=100,
                    other_views=5, distractors=2000),
    "medium": Preset("medium", image_max_side=1024, train_landmarks=1200, train_views=14, val_landmarks=120,
                     val_views=12, pairs_per_image=2, query_landmarks=14, queries_per_landmark=5,
                     db_easy=40, db_hard=30, db_junk=15, lookalike_views=20, other_landmarks=400,
                     other_views=5, distractors=10000),
}

PUBLIC_PRESETS = ("tiny", "lite", "small", "medium")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown synth preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
