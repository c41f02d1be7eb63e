"""The demo's report folder: `report.md` (and a self-contained `report.html`) from results already computed.

Nothing here trains or evaluates; it formats what the stages produced: the Table-3-shaped results,
the figures (PNG files in the same folder, linked relatively), each run's checkpoint and wandb offline
run folders, and the time every stage took.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from amldist.atomic import atomic_write_text

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CLAIMS_CAPTION = ("Each qualitative claim of the paper, checked on both test sets from the numbers above "
                  "(medium setting, learned whitening, unless the line says otherwise; thresholds in "
                  "amldist/demo/claims.py).")


@dataclass(frozen=True)
class StageTiming:
    name: str
    status: str      # "done" (ran now), "reused" (its output was already there)
    seconds: float
    detail: str = ""
    built_seconds: float | None = None  # what building it took, in this run or the one that built it


@dataclass(frozen=True)
class RunSummary:
    name: str
    description: str
    checkpoint: str
    epochs: int
    wandb_runs: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Figure:
    filename: str    # inside the report folder
    title: str
    caption: str


@dataclass
class ReportContent:
    title: str
    command: str
    setup: Sequence[str]                       # bullet lines
    table_text: str                            # format_table output
    table_markdown: str
    notes: Sequence[str] = field(default_factory=tuple)
    claims: Sequence[str] = field(default_factory=tuple)   # the paper's claims, one line each (demo.claims)
    extra_tables: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (caption, markdown table)
    figures: Sequence[Figure] = field(default_factory=tuple)
    runs: Sequence[RunSummary] = field(default_factory=tuple)
    stages: Sequence[StageTiming] = field(default_factory=tuple)


def _run_lines(runs: Sequence[RunSummary]) -> list[str]:
    lines = ["| run | what | epochs | checkpoint | wandb offline run |", "|---|---|---|---|---|"]
    for run in runs:
        wandb_cell = "<br>".join(f"`{path}`" for path in run.wandb_runs) or "– (wandb off)"
        lines.append(f"| {run.name} | {run.description} | {run.epochs} | `{run.checkpoint}` | {wandb_cell} |")
    return lines


def _stage_lines(stages: Sequence[StageTiming]) -> list[str]:
    lines = ["| stage | status | seconds now | seconds to build | detail |", "|---|---|---:|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {_built_cell(s)} | {s.detail} |" for s in stages]
    total = sum(s.seconds for s in stages)
    built = [s.built_seconds for s in stages]
    built_total = f"**{sum(built):.1f}**" if all(b is not None for b in built) else ""
    lines.append(f"| **total** | | **{total:.1f}** | {built_total} | |")
    return lines


def _built_cell(stage: StageTiming) -> str:
    return "–" if stage.built_seconds is None else f"{stage.built_seconds:.1f}"


def render_markdown(content: ReportContent) -> str:
    lines = [f"# {content.title}", "", f"Produced by `{content.command}`.", "", "## Set-up", ""]
    lines += [f"- {line}" for line in content.setup]
    lines += ["", "## Results (shaped like the paper's Table 3)", "",
              ("mAP (%) with learned whitening, medium and hard revisited protocol. SYMMETRIC: queries and "
               "database by the same network; ASYMMETRIC: student queries against the teacher's database."),
              "", content.table_markdown, "", "As printed:", "", "```", content.table_text, "```", ""]
    if content.notes:
        lines += [f"- {note}" for note in content.notes] + [""]
    if content.claims:
        lines += ["## The paper's claims, read from this table", "", CLAIMS_CAPTION, ""]
        lines += [f"- {claim}" for claim in content.claims] + [""]
    for caption, table in content.extra_tables:
        lines += [caption, "", table, ""]
    for figure in content.figures:
        lines += [f"## {figure.title}", "", f"![{figure.title}]({figure.filename})", "", figure.caption, ""]
    if content.runs:
        lines += ["## Runs", ""] + _run_lines(content.runs) + [
            "", "Upload an offline wandb run later with `wandb sync <folder>`.", ""]
    if content.stages:
        lines += ["## Stages", ""] + _stage_lines(content.stages) + [""]
    return "\n".join(lines)


def _inline_images(markdown_html: str, folder: Path, figures: Sequence[Figure]) -> str:
    for figure in figures:
        path = folder / figure.filename
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            markdown_html = markdown_html.replace(f'src="{figure.filename}"',
                                                  f'src="data:image/png;base64,{data}"')
    return markdown_html


def render_html(content: ReportContent) -> str:
    """A plain HTML page of the same content (images referenced by file name)."""
    esc = html.escape
    parts = [f"<h1>{esc(content.title)}</h1>", f"<p>Produced by <code>{esc(content.command)}</code>.</p>",
             "<h2>Set-up</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in content.setup) + "</ul>",
             "<h2>Results (shaped like the paper's Table 3)</h2>", f"<pre>{esc(content.table_text)}</pre>"]
    if content.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(note)}</li>" for note in content.notes) + "</ul>")
    if content.claims:
        parts += ["<h2>The paper's claims, read from this table</h2>", f"<p>{esc(CLAIMS_CAPTION)}</p>",
                  "<ul>" + "".join(f"<li>{esc(claim)}</li>" for claim in content.claims) + "</ul>"]
    for caption, table in content.extra_tables:
        parts += [f"<p>{esc(caption)}</p>", f"<pre>{esc(table)}</pre>"]
    for figure in content.figures:
        parts += [f"<h2>{esc(figure.title)}</h2>",
                  f'<img src="{esc(figure.filename)}" style="max-width:100%">',
                  f"<p>{esc(figure.caption)}</p>"]
    if content.runs:
        rows = "".join(f"<tr><td>{esc(r.name)}</td><td>{esc(r.description)}</td><td>{r.epochs}</td>"
                       f"<td><code>{esc(r.checkpoint)}</code></td>"
                       f"<td>{'<br>'.join(esc(p) for p in r.wandb_runs) or '– (wandb off)'}</td></tr>"
                       for r in content.runs)
        parts.append("<h2>Runs</h2><table border=1 cellpadding=4><tr><th>run</th><th>what</th><th>epochs</th>"
                     f"<th>checkpoint</th><th>wandb offline run</th></tr>{rows}</table>")
    if content.stages:
        rows = "".join(f"<tr><td>{esc(s.name)}</td><td>{esc(s.status)}</td><td>{s.seconds:.1f}</td>"
                       f"<td>{_built_cell(s)}</td><td>{esc(s.detail)}</td></tr>" for s in content.stages)
        parts.append("<h2>Stages</h2><table border=1 cellpadding=4><tr><th>stage</th><th>status</th>"
                     f"<th>seconds now</th><th>seconds to build</th><th>detail</th></tr>{rows}</table>")
    body = "\n".join(parts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(content.title)}</title></head>"
            f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'>{body}</body></html>\n")


def write_report(folder: str | Path, content: ReportContent) -> tuple[Path, Path]:
    """Write report.md and report.html (images embedded, so the page can be mailed alone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md_path, html_path = folder / REPORT_MD, folder / REPORT_HTML
    atomic_write_text(md_path, render_markdown(content))
    atomic_write_text(html_path, _inline_images(render_html(content), folder, content.figures))
    return md_path, html_path
