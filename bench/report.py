"""The run's outputs: JSON (every number), a Markdown table, a PNG bar chart, and the
DESIGN.md targets with the measured ratio and whether each is met."""

import json
import mmap
import os
import platform
import subprocess
import time
from pathlib import Path

from . import cpu, report_short

_MiB = 1 << 20

# DESIGN.md "Targets": (what, target, row, reference row or None, the ratio needed)
TARGETS = [
    ("warm re-read (page cache)", "≥ 0.95× native file", "seq.page_cache", "seq.native_pc", 0.95),
    ("sequential read from tier 1", "≥ 0.5× native disk read", "seq.tier1", "seq.native", 0.5),
    ("4 KiB random read IOPS from tier 1", "≥ 0.8× a no-op pyfuse3 fs", "rand4k.tier1",
     "rand4k.nullfs", 0.8),
    ("cold sequential read from S3", "≥ 0.8× raw parallel boto3 ranged GETs", "seq.cold",
     "seq.boto3", 0.8),
    ("4 cold readers of 4 files (issue 6)", "≥ 0.8× raw parallel boto3 ranged GETs",
     "multi4.cold", "seq.boto3", 0.8),
    ("cold small files, packed vs unpacked", "≥ 10× files/s", "small.packed", "small.cold", 10),
]
_NOT_BUILT = "not measurable yet: the feature is not built"


def machine() -> dict:
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), "0")
    disk = subprocess.run(["df", "-hT", "/var/tmp"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "memory_gib": round(int(mem) / _MiB, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "cpu": _cpu_model(), "disk": disk.strip().splitlines()[-1] if disk else "",
            "loadavg_at_start": os.getloadavg(), "new_memory_ms_per_mib_at_start": new_memory_cost()}


def new_memory_cost(mib: int = 64) -> float:
    """CPU ms per MiB to touch memory just mapped. On this VM (its balloon device reports free
    pages to the host) it is ~0.55 ms, 25x memory touched before, and it varies between runs
    with what the machine freed before them: a run with dear new memory is a slow run for
    every row that fills new pages (tieredfs's cold and tier-1 rows most), not a slow build."""
    region = mmap.mmap(-1, mib * _MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page = bytes(4096)
        t0 = time.process_time()
        for offset in range(0, len(region), len(page)):
            region[offset:offset + len(page)] = page
        return (time.process_time() - t0) * 1000 / mib
    finally:
        region.close()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def ratios(rows: list[dict]) -> None:
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        ref = by_id.get(r.get("vs", ""))
        if ref and ref["value"] and r["value"] is not None:
            r["ratio"] = r["value"] / ref["value"]


def targets(rows: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in rows}
    out = []
    for what, target, row_id, ref_id, need in TARGETS:
        row, ref = by_id.get(row_id), by_id.get(ref_id)
        if row_id is None:
            out.append({"what": what, "target": target, "measured": _NOT_BUILT, "met": None})
        elif row is None or ref is None or not ref["value"]:
            out.append({"what": what, "target": target, "measured": "not run", "met": None})
        else:
            ratio = row["value"] / ref["value"]
            out.append({"what": what, "target": target, "measured": f"{ratio:.2f}×" + _also(by_id, row),
                        "ratio": ratio, "met": ratio >= need, "rows": [row_id, ref_id]})
            parts = _parts_ceiling(by_id, row)
            if parts:
                out[-1]["parts_ceiling_ratio"] = parts[0]
    out.append(_mount_target(by_id))
    out.append(_restart_target(by_id))
    out.append(_shared_target(by_id))
    out.append(_rss_target(rows))
    return out


def _restart_target(by_id: dict) -> dict:
    row = by_id.get("restart.ready")
    what, target = "restart with 100,000 cached blocks (issue 4)", "mount ready < 2 s"
    if row is None or row["value"] is None:
        return {"what": what, "target": target, "measured": "not run (full mode, or --only restart)",
                "met": None}
    enough = row.get("cached_blocks", 0) >= 100_000
    return {"what": what, "target": target, "met": row["value"] < 2.0 if enough else None,
            "measured": f"{row['value']:.2f} s with {row.get('cached_blocks', 0):,} blocks"}


def _shared_target(by_id: dict) -> dict:
    row, ref = by_id.get("cluster.late_node"), by_id.get("cluster.shared_native")
    what, target = ("second node with a warm shared tier",
                    "0 S3 GETs for data; ≥ 0.8× a native read of the shared dir's files")
    if row is None or ref is None or not ref["value"]:
        return {"what": what, "target": target, "measured": "not run (--only cluster)", "met": None}
    ratio, gets = row["value"] / ref["value"], row["daemon"]["s3_get"]
    return {"what": what, "target": target, "ratio": ratio, "met": gets == 0 and ratio >= 0.8,
            "measured": f"{gets} GETs, {ratio:.2f}×", "rows": [row["id"], ref["id"]]}


# Second references that say whose cost a miss is: (row, reference, label), where row None
# is the target's own row.
_ALSO = {"seq.page_cache": [(None, "seq.nullfs_pc", "the no-op FUSE fs in page cache")],
         "seq.tier1": [(None, "seq.nullfs", "the no-op FUSE fs"),
                       (None, "seq.blockfiles", "tier 1's files read directly")],
         "seq.cold": [("seq.cold_nowait", "seq.boto3", "with --cache-fill-wait 0"),
                      (None, "seq.diskwrite", "the cache disk's write speed")],
         "rand4k.tier1": [("rand4k.tier1_warm", "rand4k.nullfs",
                           "with tier 1's files in the page cache")],
         # A packed walk runs at about tier 1's walk: what bounds both is the work per file.
         "small.packed": [("small.tier1", "small.cold", "tier 1's walk"),
                          ("small.tier1", "small.nullfs", "tier 1's walk against the no-op FUSE fs"),
                          ("small.nullfs", "small.cold", "the no-op FUSE fs's walk: a pyfuse3 ceiling")]}


_CEILING_VS = {"seq.cold": "seq.boto3", "multi4.cold": "seq.boto3", "seq.tier1": "seq.native"}

# The parts of a cold read that no daemon built on boto3 and pyfuse3 can skip, each measured
# alone in this run: the GETs (the cheapest boto3 trial, its S3 server included), handing the
# bytes to the reader through FUSE (the no-op fs, fio and the kernel included) and writing
# them to the cache disk. Where the S3 server shares the cores, their CPU per byte added up
# bounds what any such daemon could read at, however little waits and however little glue
# it adds.
_PARTS = {"seq.cold": ("seq.boto3", "seq.nullfs", "seq.diskwrite"),
          "multi4.cold": ("seq.boto3", "multi4.nullfs", "seq.diskwrite")}


def _also(by_id: dict, row: dict) -> str:
    notes = []
    for num_id, ref_id, label in _ALSO.get(row["id"], []):
        num, ref = by_id.get(num_id) if num_id else row, by_id.get(ref_id)
        if num and ref and num["value"] and ref["value"]:
            notes.append(f"{num['value'] / ref['value']:.2f}× {label}")
    if row["id"] == "seq.page_cache":  # the kernel's share of a miss (bench/folios.py)
        native, ours = by_id.get("folio.native"), by_id.get("folio.tieredfs")
        if native and ours and native["value"] and ours["value"]:
            notes.append(f"page-cache folios of {ours['value']:.0f} KiB, native {native['value']:.0f} KiB")
    if row["id"] in _CEILING_VS:
        # Had nothing waited: what the cores give at the CPU per byte this run measured.
        ref, ceiling = by_id.get(_CEILING_VS[row["id"]]), _ceiling(row)
        if ref and ref["value"] and ceiling:
            notes.append(f"at most {ceiling / ref['value']:.2f}× at this run's CPU per byte "
                         f"on {os.cpu_count()} cores, had nothing waited")
    parts = _parts_ceiling(by_id, row)
    if parts:
        ratio, busy = parts
        notes.append(f"at most {ratio:.2f}× for any daemon on boto3 and pyfuse3 that caches "
                     f"what it reads, on {os.cpu_count()} cores: the cheapest boto3 trial, the "
                     f"no-op fs and the cache disk's writes cost {busy:.2f} s of CPU per GiB "
                     "together")
    if row["id"] == "rand4k.tier1":
        # At iodepth 1 a read whose bytes are not in memory waits for the disk, then for the
        # FUSE round trip the no-op fs is all of: their latencies add up.
        disk, null = by_id.get("rand4k.native"), by_id.get("rand4k.nullfs")
        if disk and null and disk["value"] and null["value"]:
            notes.append(f"{disk['value'] / (disk['value'] + null['value']):.2f}× if every read "
                         "waited for the disk and for FUSE in turn")
    return f" ({'; '.join(notes)})" if notes else ""


def _parts_ceiling(by_id: dict, row: dict) -> tuple[float, float] | None:
    """(the ratio to the reference, the parts' CPU seconds per GiB) of _PARTS, if measured."""
    ref = by_id.get(_CEILING_VS.get(row["id"], ""))
    parts = [by_id.get(i) for i in _PARTS.get(row["id"], ())]
    measured = all(p and p.get("cpu") and p.get("bytes") for p in parts)
    if not parts or not measured or not ref or not ref["value"]:
        return None
    busy = sum(_least_cpu_per_gib(p) for p in parts)
    return (os.cpu_count() or 1) * 1024 / busy / ref["value"], busy


def _least_cpu_per_gib(row: dict) -> float:
    """The machine's CPU per GiB of a row, or of the cheapest of its trials (the boto3 row's
    grid of thread counts and range sizes): the part costs at least that, however it is done."""
    runs = [row, *(t for t in row.get("trials", []) if isinstance(t, dict))]
    return min(cpu.per_gib(t["cpu"], t["bytes"])["busy"]
               for t in runs if t.get("cpu") and t.get("bytes"))


def _ceiling(row: dict) -> float | None:
    return cpu.ceiling_mib_s(row["cpu"], row["bytes"]) if row.get("cpu") and row.get("bytes") else None


def _mount_target(by_id: dict) -> dict:
    ids = ["mount.empty", "mount.warm", "restart.ready", "bigbucket.ready"]
    found = [by_id[i] for i in ids if i in by_id and by_id[i]["value"] is not None]
    what, target = "mount ready", "< 1 s, including for a bucket of 100,000 objects"
    if not found:
        return {"what": what, "target": target, "measured": "not run", "met": None}
    worst = max(found, key=lambda r: r["value"])
    text = ", ".join(f"{r['value']:.2f} s ({r['label']})" for r in found)
    has_big = "bigbucket.ready" in [r["id"] for r in found]
    met = worst["value"] < 1.0 if has_big else (False if worst["value"] >= 1.0 else None)
    note = "" if has_big else "; the 100,000-object bucket runs in full mode only"
    if "mount.nullfs" in by_id:
        note += f"; the no-op FUSE fs in the same run: {by_id['mount.nullfs']['value']:.2f} s"
    return {"what": what, "target": target, "measured": text + note, "met": met}


def _rss_target(rows: list[dict]) -> dict:
    rss = [r for r in rows if r.get("peak_rss_bytes")]
    what, target = "daemon RSS", "< 256 MiB under load, whatever the number of open files"
    if not rss:
        return {"what": what, "target": target, "measured": "not run", "met": None}
    worst = max(rss, key=lambda r: r["peak_rss_bytes"])
    mib = worst["peak_rss_bytes"] / _MiB
    many = next((r for r in rss if r["workload"] == "open200"), None)
    also = (f"; {many['readers']} files open at once: {many['peak_rss_bytes'] / _MiB:.0f} MiB" if many
            else "; many open files not exercised (--only open200)")
    return {"what": what, "target": target, "met": mib < 256,
            "measured": f"peak {mib:.0f} MiB ({worst['id']})" + also}


_fmt = report_short.fmt  # one way to show a value in every table


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"Endpoint: **{meta['endpoint']}**" + (f", +{meta['s3_latency_ms']} ms per request "
             "(delaying proxy)" if meta["s3_latency_ms"] else "") + f". Mode: {meta['mode']}, "
             f"block size {meta['block_size']}.", "",
             "| workload | row | result | vs | ratio | S3 GET/HEAD/LIST | S3 MiB | peak RSS | local hits "
             "| CPU s per GiB (or ms per file): all (daemon, S3 server, bench), idle |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        if r["workload"] == "peers":  # their own table, below
            continue
        d = r.get("daemon")
        reqs = f"{d['s3_get']}/{d['s3_head']}/{d['s3_list']}" if d else ""
        s3_mib = f"{d['s3_bytes'] / _MiB:.0f}" if d else ""
        rss = f"{r['peak_rss_bytes'] / _MiB:.0f} MiB" if r.get("peak_rss_bytes") else ""
        hit = d["local_hit_ratio"] if d else None
        lines.append(f"| {r['workload']} | {r['label']} | {_fmt(r['value'], r['metric'])} | "
                     f"{r.get('vs', '')} | {_ratio(r)} | {reqs} | {s3_mib} | {rss} | "
                     f"{'' if hit is None else f'{hit:.0%}'} | {_cpu_cell(r)} |")
    lines += ["", "| target (DESIGN.md) | wanted | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['what']} | {t['target']} | {t['measured']} | {met} |")
    if peers := report_short.peers_markdown(result):
        lines += ["", "Peers (python -m bench --peers: fresh mount and empty cache each):", "", peers]
    return "\n".join(lines) + "\n"


def _cpu_cell(r: dict) -> str:
    """The machine's busy CPU per GiB the row moved, the named processes' part of it, and
    the share of the cores that sat idle (bench/cpu.py)."""
    if r.get("cpu") and r.get("files") and r["metric"] == "files/s":
        g = cpu.per_unit(r["cpu"], r["files"] / 1000)  # seconds per 1,000 files: ms per file
    elif r.get("cpu") and r.get("bytes") and r["metric"] == "MiB/s":
        g = cpu.per_gib(r["cpu"], r["bytes"])
    else:
        return ""
    named = ", ".join(f"{g[k]:.2f}" if k in g else "–" for k in ("daemon", "server", "bench"))
    return f"{g['busy']:.2f} ({named}), {g['idle_share']:.0%}"


def _ratio(r: dict) -> str:
    if "ratio" not in r:
        return ""
    return f"{r['ratio']:.2f}×"


def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(w, [r for r in result["rows"] if r["workload"] == w and r["value"]])
              for w in ("seq", "multi4", "rand4k", "small")]
    groups = [(w, rows) for w, rows in groups if rows]
    if not groups:
        return
    n_bars = sum(len(rows) for _, rows in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.2 * len(groups) + 0.32 * n_bars),
                             squeeze=False)
    for ax, (w, rows) in zip(axes[:, 0], groups):
        rows = rows[::-1]
        values = [r["value"] for r in rows]
        ax.barh([r["label"] for r in rows], values,
                color=["#999999" if r["kind"] == "reference" else "#1f77b4" for r in rows])
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 3, max(values) * 4)  # room for the value labels
        for y, v in enumerate(values):
            ax.text(v * 1.08, y, f"{v:,.0f}", va="center", fontsize=7)
        ax.set_title(f"{w}: {rows[0]['metric']} (log scale; grey = reference rows)", fontsize=9)
        ax.tick_params(labelsize=8)
    meta = result["meta"]
    fig.suptitle(f"tieredfs bench, {meta['mode']} mode, {meta['endpoint_kind']}"
                 + (f" +{meta['s3_latency_ms']} ms" if meta["s3_latency_ms"] else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "png": out_dir / f"{stem}.png", "peers_png": out_dir / f"{stem}-peers.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    chart(result, paths["png"])
    report_short.peers_chart(result, paths["peers_png"])
    return {k: p for k, p in paths.items() if p.exists()}


def key(result: dict) -> str:
    """quick, full, quick+20ms: which kind of run this is."""
    meta = result["meta"]
    return meta["mode"] + (f"+{meta['s3_latency_ms']:g}ms" if meta["s3_latency_ms"] else "")


def update_docs(result: dict, png: Path | None, doc: Path) -> None:
    """Replace this run's section of docs/benchmarks.md (between `<!-- bench:begin KEY -->` and
    `<!-- bench:end KEY -->`, KEY from key()) with its table and chart."""
    meta, m = result["meta"], result["meta"]["machine"]
    key_ = key(result)
    begin, end_marker = f"<!-- bench:begin {key_} -->", f"<!-- bench:end {key_} -->"
    chart_name = f"benchmarks-{key_}.png"
    if png is not None:
        (doc.parent / chart_name).write_bytes(png.read_bytes())
    ds = meta["dataset"]
    body = "\n".join([
        begin,
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s), {meta['started']}, git {meta['git']}.",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, kernel {m['kernel']}, "
        f"disk `{m['disk']}`, load average {m['loadavg_at_start'][0]:.1f} at start, "
        f"{m['loadavg_at_end'][0]:.1f} at the end (other work on the machine makes numbers noisy), "
        f"new memory {m['new_memory_ms_per_mib_at_start']:.2f} ms/MiB to touch at start, "
        f"{m['new_memory_ms_per_mib_at_end']:.2f} at the end (`report.new_memory_cost`).",
        f"Dataset: big file {ds['big'] >> 20} MiB, 4 × {ds['multi_each'] >> 20} MiB, "
        f"{ds['small_files']} small files ({ds['small_bytes'] >> 20} MiB).", "",
        markdown(result),
        f"![throughput vs reference rows]({chart_name})" if png is not None else "",
        end_marker])
    text = doc.read_text()
    if begin not in text or end_marker not in text:
        raise ValueError(f"{doc} has no {begin} ... {end_marker} section to update")
    start, end = text.index(begin), text.index(end_marker) + len(end_marker)
    doc.write_text(text[:start] + body + text[end:])
