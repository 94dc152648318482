"""The gallery page: one self-contained HTML file that opens from disk, with no server and no network.

Everything it needs is inline (style, the histogram as CSS bars, a few lines of script) except the
thumbnails beside it in `thumbs/`. Every text that came from the output (captions, keys, sources,
messages, provenance) is HTML-escaped, so a caption holding markup shows as text. The script only marks
each thumbnail `data-loaded="yes"` (or `"no"`) once the browser has decoded it, which makes a page
whose images did not load visible to a headless browser check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape
from typing import Any

from caprl_cli import __version__
from caprl_cli.gallery.reading import PublishedRow
from caprl_cli.gallery.sampling import OutputStats, histogram
from caprl_cli.gallery.thumbnails import Thumbnail

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.tile{display:flex;gap:12px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:0}
.tile.error{border-color:#d88}
.thumb,.placeholder{width:256px;height:256px;flex:none;object-fit:contain;background:#eee}
.placeholder{display:flex;align-items:center;justify-content:center;text-align:center;color:#777;padding:8px;box-sizing:border-box}
.caption{white-space:pre-wrap;margin:4px 0} .facts{color:#666;font-size:12px}
.bars{display:flex;align-items:flex-end;gap:2px;height:140px;border-bottom:1px solid #999}
.bar{background:#4a7ab5;min-width:14px;flex:1} .bar span{display:none}
.axis{display:flex;gap:2px;font-size:10px;color:#666} .axis div{flex:1;min-width:14px;overflow:hidden}
.err{color:#a33}
"""

SCRIPT = """
for (const img of document.querySelectorAll('img.thumb')) {
  const mark = () => { img.dataset.loaded = img.naturalWidth > 0 ? 'yes' : 'no'; };
  if (img.complete) { mark(); } else { img.addEventListener('load', mark); img.addEventListener('error', mark); }
}
"""

PROVENANCE_FIELDS = (
    ("model", "model"), ("model_revision", "revision"), ("engine", "engine"), ("engine_version", "engine version"),
    ("prompt", "prompt"), ("system_prompt", "system prompt"), ("format", "format"),
    ("caprl_cli_version", "caprl-cli"),
)


def render_page(
    label: str,
    sample: list[PublishedRow],
    thumbnails: list[Thumbnail],
    stats: OutputStats,
    provenance: dict[str, Any] | None,
    *,
    seed: int,
    status: str | None,
) -> str:
    """The whole page as one HTML document."""
    what = f"{len(sample)} sampled of {stats.rows} rows (seed {seed}" + (f", status {status})" if status else ")")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>caprl gallery: {escape(label)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Captions in <code>{escape(label)}</code></h1>",
        f'<p id="summary">{escape(what)}; made by caprl-cli {escape(__version__)}</p>',
        _provenance(provenance),
        _numbers(stats),
        _errors(stats),
        f'<h2>Sample</h2><div class="grid" id="sample">{"".join(_tile(i, s, t) for i, (s, t) in enumerate(zip(sample, thumbnails, strict=True)))}</div>',
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _provenance(provenance: dict[str, Any] | None) -> str:
    if not provenance:
        return '<h2>Provenance</h2><p id="provenance">No provenance was found beside this output.</p>'
    rows = [(title, provenance.get(name)) for name, title in PROVENANCE_FIELDS if provenance.get(name) is not None]
    for name in ("sampling", "pixels"):
        if isinstance(provenance.get(name), dict):
            rows.append((name, ", ".join(f"{k}={v}" for k, v in provenance[name].items())))
    run = provenance.get("run")
    if isinstance(run, dict):
        rows.append(("last run", f"{run.get('started_at')} to {run.get('finished_at')}, {run.get('images')} images"))
    table = "".join(f"<tr><th>{escape(str(title))}</th><td>{_text(value)}</td></tr>" for title, value in rows)
    return f'<h2>Provenance</h2><table id="provenance">{table}</table>'


def _text(value: Any) -> str:
    return escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def _numbers(stats: OutputStats) -> str:
    status = ", ".join(f"{escape(k)} {n}" for k, n in sorted(stats.by_status.items())) or "no rows"
    reasons = "".join(
        f"<tr><td>{escape(k)}</td><td>{n}</td></tr>" for k, n in sorted(stats.finish_reasons.items())
    )
    bins = list(histogram(stats.lengths))
    tallest = max((count for _, _, count in bins), default=0) or 1
    bars = "".join(
        f'<div class="bar" style="height:{100 * count / tallest:.1f}%" title="{low}-{high} words: {count}"'
        f' data-count="{count}"><span>{count}</span></div>'
        for low, high, count in bins
    )
    axis = "".join(f"<div>{low}</div>" for low, _, _ in bins)
    chart = (
        f'<div class="bars" id="lengths">{bars}</div><div class="axis">{axis}</div>'
        if bins else "<p>No captions.</p>"
    )
    return (
        f"<h2>Rows</h2><p>{status}</p>"
        f'<h3>finish_reason</h3><table id="finish-reasons">{reasons}</table>'
        f"<h3>Caption length (words)</h3>{chart}"
    )


def _errors(stats: OutputStats) -> str:
    if not stats.errors_by_kind:
        return '<h2>Errors</h2><p id="errors">No error rows.</p>'
    sections = []
    for kind, count in sorted(stats.errors_by_kind.items(), key=lambda item: (-item[1], item[0])):
        examples = stats.error_examples.get(kind, [])
        items = "".join(f"<li><code>{escape(key)}</code>: {escape(message)}</li>" for key, message in examples)
        more = f"<li>and {count - len(examples)} more</li>" if count > len(examples) else ""
        sections.append(
            f'<details class="kind" data-kind="{escape(kind)}" data-count="{count}" open>'
            f"<summary><b>{escape(kind)}</b>: {count}</summary><ul>{items}{more}</ul></details>"
        )
    return f'<h2>Errors</h2><div id="errors">{"".join(sections)}</div>'


def _tile(position: int, item: PublishedRow, thumbnail: Thumbnail) -> str:
    row = item.row
    key = str(row.get("key"))
    if thumbnail.name is not None:
        picture = f'<img class="thumb" src="thumbs/{thumbnail.name}" alt="{escape(key)}" loading="eager">'
    else:
        picture = f'<div class="placeholder">{escape(thumbnail.missing or "no image")}</div>'
    status = str(row.get("status"))
    if status == "error":
        body = f'<p class="err">{escape(str(row.get("error")))}</p>'
    else:
        captions = row.get("captions") or [row.get("caption") or ""]
        body = "".join(f'<p class="caption">{escape(str(text or ""))}</p>' for text in captions)
    facts = _facts(row)
    return (
        f'<figure class="tile {escape(status)}" data-key="{escape(key)}" data-status="{escape(status)}">'
        f"{picture}<figcaption><div class=\"mono\">{escape(key)}</div>{body}"
        f'<div class="facts">{escape(facts)}</div></figcaption></figure>'
    )


def _facts(row: dict[str, Any]) -> str:
    found: Iterable[str] = (
        f"{row['width']}x{row['height']}" if row.get("width") and row.get("height") else "",
        f"finish_reason {row['finish_reason']}" if row.get("finish_reason") else "",
        f"{row['output_tokens']} tokens" if row.get("output_tokens") is not None else "",
        f"source {row['source']}" if row.get("source") else "",
    )
    return " · ".join(text for text in found if text)
