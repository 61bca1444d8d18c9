"""The short tables docs/benchmarks.md opens with, read in a minute: tieredfs against its
reference rows (workload, tieredfs, reference, ratio), and tieredfs against its peers
(rclone mount, s3fs, JuiceFS) with the peers' chart. `--update-docs` rewrites them between
`<!-- bench:begin summary-KEY -->` / `<!-- bench:begin peers-KEY -->` and their end markers.
"""

import os
from pathlib import Path

from .workloads_peers import ROWS, TOOLS

# (workload, the tieredfs row, its reference row): the rows a user asks about first.
SUMMARY = (
    ("cold sequential read (S3)", "seq.cold", "seq.boto3"),
    ("4 cold readers of 4 files", "multi4.cold", "seq.boto3"),
    ("re-read from the page cache", "seq.page_cache", "seq.native_pc"),
    ("sequential read from tier 1", "seq.tier1", "seq.native"),
    ("4 KiB random, tier 1, O_DIRECT", "rand4k.tier1", "rand4k.nullfs"),
    ("small files cold (S3)", "small.cold", "small.boto3"),
    ("small files from tier 1", "small.tier1", "small.native"),
    ("small files cold, packed (S3)", "small.packed", "small.cold"),
    ("first byte, cold", "ttfb.cold", "ttfb.boto3"),
    ("mount ready, empty cache", "mount.empty", "mount.nullfs"),
)
_LOWER_IS_BETTER = {"ms", "s", "MiB"}
NAMES = {"tieredfs": "tieredfs", "rclone": "rclone mount (vfs full)", "s3fs": "s3fs (use_cache)",
         "juicefs": "JuiceFS (sqlite meta)"}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("s", "ms"):
        return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def summary_markdown(result: dict) -> str:
    by_id = {r["id"]: r for r in result["rows"]}
    lines = ["| workload | tieredfs | reference | ratio |", "|---|---:|---|---:|"]
    for what, row_id, ref_id in SUMMARY:
        row, ref = by_id.get(row_id), by_id.get(ref_id)
        if row is None or ref is None:
            continue
        ratio = (f"{row['value'] / ref['value']:.2f}×" if row["value"] and ref["value"] else "–")
        if row["metric"] in _LOWER_IS_BETTER:
            ratio += " (lower is better)"
        lines.append(f"| {what} | {fmt(row['value'], row['metric'])} | {ref['label']}: "
                     f"{fmt(ref['value'], ref['metric'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def peer_table(result: dict) -> dict[str, dict[str, dict]]:
    """{row key: {tool: row}} of the peer rows."""
    table: dict[str, dict[str, dict]] = {}
    for r in result["rows"]:
        if r["workload"] == "peers":
            table.setdefault(r["row"], {})[r["tool"]] = r
    return table


def ahead(key: str, cells: dict[str, dict]) -> float | None:
    """tieredfs against the best peer, > 1 when tieredfs is ahead (for times and memory: the
    best peer's over tieredfs's)."""
    higher = next(h for k, _, _, h in ROWS if k == key)
    ours = (cells.get("tieredfs") or {}).get("value")
    theirs = [c["value"] for t, c in cells.items() if t != "tieredfs" and c.get("value")]
    if not ours or not theirs:
        return None
    return ours / max(theirs) if higher else min(theirs) / ours


def peers_markdown(result: dict) -> str:
    table = peer_table(result)
    if not table:
        return ""
    lines = ["| | " + " | ".join(NAMES[t] for t in TOOLS) + " | tieredfs vs best peer (> 1: ahead) |",
             "|---|" + "---:|" * (len(TOOLS) + 1)]
    notes: dict[str, str] = {}
    for key, what, unit, _ in ROWS:
        cells = table.get(key, {})
        shown = []
        for tool in TOOLS:
            cell = cells.get(tool, {})
            text = fmt(cell.get("value"), "").strip()
            if cell.get("note"):
                mark = notes.setdefault(f"{tool}: {cell['note']}", f"[{len(notes) + 1}]")
                text = f"{text} {mark}"
            shown.append(text)
        ratio = ahead(key, cells)
        lines.append(f"| {what}, {unit} | " + " | ".join(shown)
                     + f" | {'–' if ratio is None else f'{ratio:.2f}×'} |")
    versions = {c["tool"]: c["version"] for cells in table.values() for c in cells.values()
                if c.get("version")}
    if versions:
        lines += ["", "Versions: " + "; ".join(versions[t] for t in TOOLS if t in versions) + "."]
    if notes:
        lines.append("")
        lines += [f"{mark} {text}" for text, mark in notes.items()]
    return "\n".join(lines) + "\n"


def peers_chart(result: dict, path: Path) -> None:
    table = peer_table(result)
    if not table:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ROWS), 1, figsize=(8, 1.05 * len(ROWS) + 0.6), squeeze=False)
    for ax, (key, what, unit, higher) in zip(axes[:, 0], ROWS):
        cells = table.get(key, {})
        tools = list(TOOLS)[::-1]
        values = [(cells.get(t) or {}).get("value") or 0 for t in tools]
        ax.barh([NAMES[t] for t in tools], values,
                color=["#1f77b4" if t == "tieredfs" else "#999999" for t in tools])
        top = max(values) or 1
        ax.set_xlim(0, top * 1.25)
        for y, v in enumerate(values):
            ax.text(v + top * 0.01, y, fmt(v, "").strip() if v else "n/a", va="center", fontsize=7)
        ax.set_title(f"{what}, {unit} ({'higher' if higher else 'lower'} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    meta = result["meta"]
    load = meta.get("machine", {}).get("loadavg_at_start", [0])[0]
    fig.suptitle(f"tieredfs and its peers, {meta['mode']} mode"
                 + (f", +{meta['s3_latency_ms']:g} ms per S3 request" if meta["s3_latency_ms"] else "")
                 + f" (load average {load:.1f} on {os.cpu_count()} cores at start)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(result: dict, key: str, peers_png: Path | None, doc: Path) -> list[str]:
    """Rewrite the summary-KEY and peers-KEY sections that doc has; the names of those written."""
    meta, m = result["meta"], result["meta"]["machine"]
    stamp = (f"Command: `{meta['command']}`, {meta['started']}, git {meta['git']}; load average "
             f"{m['loadavg_at_start'][0]:.1f} at start, {m['loadavg_at_end'][0]:.1f} at the end "
             f"on {m['nproc']} cores.")
    sections = {f"summary-{key}": summary_markdown(result)}
    if peer_table(result):
        chart = f"benchmarks-peers-{key}.png"
        if peers_png is not None and peers_png.exists():
            (doc.parent / chart).write_bytes(peers_png.read_bytes())
        sections[f"peers-{key}"] = peers_markdown(result) + f"\n![tieredfs and its peers]({chart})\n"
    text, written = doc.read_text(), []
    for name, body in sections.items():
        begin, end = f"<!-- bench:begin {name} -->", f"<!-- bench:end {name} -->"
        if begin not in text or end not in text:
            continue
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + "\n".join([begin, stamp, "", body.rstrip("\n"), end]) + text[b:]
        written.append(name)
    doc.write_text(text)
    return written
