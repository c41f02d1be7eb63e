"""The embedded end-to-end demo (`amldist demo`, `make demo`): synthetic data to a Table-3-shaped report.

    settings = demo_settings("tiny")          # make demo's; "lite" (pretrained), "small"; "micro": tests
    result = run_demo(settings, force=())     # prints one line per stage, writes runs/demo/report.md

Stages (docs in amldist.demo.pipeline): synthesise and shard the landmark sets, train the teacher, store
its features, train three students (Contr+ asym, Reg asym, Contr sym alone), evaluate sym/asym testing
with learned whitening, and write the report (table, training curves, Fig. 2 negatives, Fig. 3 t-SNE).
Every stage reuses complete output from an earlier run; `force` redoes the named stages.
"""

from amldist.demo.pipeline import STAGES, DemoResult, run_demo
from amldist.demo.settings import DEMO_PRESETS, DemoSettings, demo_settings

__all__ = ["DEMO_PRESETS", "STAGES", "DemoResult", "DemoSettings", "demo_settings", "run_demo"]
