"""Bring your own landmarks: a folder per landmark, or GLDv2's CSV and image tree, imported into a training
set in SfM-120k's layout and pickle format (docs/DATA.md, "Your own landmarks").

    import_folders("photos/", root="data", name="my-landmarks")          # photos/<landmark>/**/<image>
    import_gldv2("train_clean.csv", "gldv2/train", root="data", name="gldv2-clean")
"""

from amldist.datasets.importing.pipeline import ImportOptions, RunSettings, import_folders, import_gldv2
from amldist.datasets.importing.sources import read_gldv2_csv

__all__ = ["ImportOptions", "RunSettings", "import_folders", "import_gldv2", "read_gldv2_csv"]
