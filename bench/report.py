"""results.json, summary.md and the PNG charts of a bench run.

Every figure in the summary is a median over rounds; a ratio is the median of
the per-round ratios ours/peer (each round's pair ran back to back, so the
ratio cancels most of the machine's drift). On the FerretDB test server the
MongoDB backend is reported only as ratios to the raw driver: its absolute
speed says nothing about GridFS on a real MongoDB.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from . import stats

HIGHER_IS_BETTER = {"mb_s", "req_s"}


def _key(rec: dict) -> tuple:
    return rec["backend"], rec["scenario"], json.dumps(rec["point"], sort_keys=True)


def aggregate(records: list[dict]) -> list[dict]:
    groups: dict[tuple, dict] = defaultdict(lambda: {"ours": {}, "peer": {}})
    order: list[tuple] = []
    for rec in records:
        k = _key(rec)
        if k not in groups:
            order.append(k)
        groups[k][rec["side"]][rec["round"]] = rec
    rows = []
    for k in order:
        g = groups[k]
        ours, peer = g["ours"], g["peer"]
        any_rec = next(iter(ours.values()), None) or next(iter(peer.values()))
        names = sorted({m for r in [*ours.values(), *peer.values()] for m in r["metrics"]})
        metrics = {}
        for m in names:
            o = [r["metrics"].get(m) for r in ours.values()]
            p = [r["metrics"].get(m) for r in peer.values()]
            ratios = [ours[i]["metrics"].get(m) / peer[i]["metrics"][m] for i in ours
                      if i in peer and _num(ours[i]["metrics"].get(m)) and _num(peer[i]["metrics"].get(m))
                      and peer[i]["metrics"][m] != 0]
            metrics[m] = {"ours": stats.median(_nums(o)), "peer": stats.median(_nums(p)),
                          "ratio": stats.median(ratios), "ours_rounds": o, "peer_rounds": p,
                          "ours_min": min(_nums(o), default=math.nan), "ours_max": max(_nums(o), default=math.nan),
                          "peer_min": min(_nums(p), default=math.nan), "peer_max": max(_nums(p), default=math.nan)}

        def proc(side, field, how=stats.median):
            vals = [r["process"].get(field) for r in side.values() if r.get("process")]
            return how(_nums(vals)) if _nums(vals) else None

        def cpu_per_gb(side):
            vals = [r["process"]["cpu_s"] / r["metrics"]["gb"] for r in side.values()
                    if r.get("process") and _num(r["metrics"].get("gb")) and r["metrics"]["gb"] > 0]
            return stats.median(vals) if vals else None

        rows.append({
            "backend": k[0], "scenario": k[1], "point": json.loads(k[2]),
            "ours_who": next((r["who"] for r in ours.values()), None),
            "peer_who": next((r["who"] for r in peer.values()), None),
            "rounds": len(ours), "metrics": metrics,
            "ours_rss_peak_mb_max": proc(ours, "rss_peak_mb", max),
            "ours_rss_peak_mb_median": proc(ours, "rss_peak_mb"),
            "ours_rss_peak_process_mb_max": proc(ours, "rss_peak_process_mb", max),
            "ours_rss_start_mb": proc(ours, "rss_start_mb"),
            "peer_rss_peak_mb_max": proc(peer, "rss_peak_mb", max),
            "ours_cpu_s_per_gb": cpu_per_gb(ours), "peer_cpu_s_per_gb": cpu_per_gb(peer),
            "ours_client_busy_max": max(_nums([r.get("client_busy") for r in ours.values()]), default=None),
            "peer_client_busy_max": max(_nums([r.get("client_busy") for r in peer.values()]), default=None),
            "ours_errors": sum(r["errors"] for r in ours.values()),
            "peer_errors": sum(r["errors"] for r in peer.values()),
            "ours_requests": sum(r["requests"] for r in ours.values()),
            "peer_requests": sum(r["requests"] for r in peer.values()),
            "ours_verified": sum(r["verified"] for r in ours.values()),
            "peer_verified": sum(r["verified"] for r in peer.values()),
            "verify": sorted({v for r in [*ours.values(), *peer.values()] for v in r["verify_method"]}),
            "_example": any_rec["point"],
        })
    for row in rows:
        row.pop("_example")
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _nums(vs) -> list[float]:
    return [v for v in vs if _num(v)]


# -- targets ----------------------------------------------------------------------------------------------


def _find(rows, backend, scenario, **point):
    return [r for r in rows if backend in (None, r["backend"]) and r["scenario"] == scenario
            and all(r["point"].get(k) == v for k, v in point.items())]


def targets(rows: list[dict], records: list[dict], meta: dict) -> list[dict]:
    out = []

    def add(name, figure, met, note=""):
        out.append({"target": name, "figure": figure, "met": met, "note": note})

    backends = {r["backend"] for r in rows}
    if "embedded" in backends:
        single = _find(rows, "embedded", "single")
        c1 = _find(rows, "embedded", "concurrent", workers=1, concurrency=1)
        parts = [(f"{r['point']['size_mb']} MB single stream", r["metrics"]["mb_s"]["ratio"]) for r in single]
        parts += [("256 MB-file at 1 client" if not c1 else f"{c1[0]['point']['size_mb']} MB file, concurrent x1",
                   c1[0]["metrics"]["mb_s"]["ratio"])] if c1 else []
        if parts:
            add("embedded >= 0.9x nginx, single stream", ", ".join(f"{n}: {v:.2f}x" for n, v in parts),
                all(v >= 0.9 for _, v in parts))
        for w in sorted({r["point"].get("workers") for r in _find(rows, "embedded", "concurrent")}):
            c16 = _find(rows, "embedded", "concurrent", workers=w, concurrency=16)
            if c16:
                v = c16[0]["metrics"]["mb_s"]["ratio"]
                add(f"embedded >= 0.9x nginx at 16 concurrent clients ({w} worker{'s' * (w > 1)}, nginx the same)",
                    f"{v:.2f}x ({c16[0]['metrics']['mb_s']['ours']:.0f} vs "
                    f"{c16[0]['metrics']['mb_s']['peer']:.0f} MB/s)",
                    v >= 0.9)
    if "mongodb" in backends:
        parts = [(f"{r['point']['size_mb']} MB single stream", r["metrics"]["mb_s"]["ratio"])
                 for r in _find(rows, "mongodb", "single")]
        parts += [(f"{r['point']['size_mb']} MB x{r['point']['concurrency']} (w{r['point']['workers']})",
                   r["metrics"]["mb_s"]["ratio"]) for r in _find(rows, "mongodb", "concurrent")]
        if parts:
            add("mongodb >= 0.9x the raw driver's read of the same file", ", ".join(f"{n}: {v:.2f}x" for n, v in parts),
                all(v >= 0.9 for _, v in parts))
    for b in sorted(backends):
        for r in _find(rows, b, "concurrent", concurrency=64):
            mb = r["ours_rss_peak_mb_max"]
            w = r["point"]["workers"]
            note = "" if r["point"]["size_mb"] >= 256 else f"measured with a {r['point']['size_mb']} MB file"
            if w > 1:
                note = (note + "; " if note else "") + (
                    f"sum over supervisor and {w} workers; largest process {r['ours_rss_peak_process_mb_max']:.0f} MB")
            # The target is about one service process; with more workers the
            # tree holds several interpreters, so that row is for information.
            add(f"{b}: service RSS <= 150 MB during 64 concurrent downloads ({w} worker{'s' * (w > 1)})",
                f"peak {mb:.0f} MB (at start {r['ours_rss_start_mb']:.0f} MB)", mb <= 150 if w == 1 else None, note)
        for r in _find(rows, b, "ttfb"):
            v = r["metrics"]["ttfb_90_over_0"]["ours"]
            add(f"{b}: TTFB at 90% of the {r['point']['size_mb']} MB file <= 1.5x TTFB at offset 0",
                f"{v:.2f}x ({r['metrics']['ttfb_at_90_ms']['ours']:.2f} vs "
                f"{r['metrics']['ttfb_at_0_ms']['ours']:.2f} ms;"
                f" peer {r['metrics']['ttfb_90_over_0']['peer']:.2f}x)", v <= 1.5)
    for r in _find(rows, "embedded", "floors"):
        op, peer, m = r["point"]["op"], r["point"]["peer"], r["metrics"]
        if op in ("get", "list"):
            add(f"embedded: {op} req/s >= 0.7x a bare aiohttp handler returning the same bytes",
                f"{m['req_s']['ratio']:.2f}x ({m['req_s']['ours']:.0f} vs {m['req_s']['peer']:.0f} req/s; p99 "
                f"{m['lat_p99_ms']['ours']:.1f} vs {m['lat_p99_ms']['peer']:.1f} ms)", m["req_s"]["ratio"] >= 0.7)
        elif op.startswith("download") and peer == "floor":
            add(f"embedded: {op} over {r['point']['connections']} connections >= 0.5x a bare aiohttp handler",
                f"{m['req_s']['ratio']:.2f}x ({m['req_s']['ours']:.0f} vs {m['req_s']['peer']:.0f} req/s)",
                m["req_s"]["ratio"] >= 0.5)
        elif op.startswith("ttfb"):
            t = m["ttfb_p50_ms"]
            add("embedded: time to first byte of one download <= 2x nginx's",
                f"{t['ratio']:.2f}x ({t['ours']:.2f} vs {t['peer']:.2f} ms)", t["ratio"] <= 2.0)
    for r in _find(rows, "embedded", "upload_hashlib"):
        m = r["metrics"]["mb_s"]
        add(f"embedded: single-stream upload ({_method(r)}) >= 0.8x hashlib.sha256 of the same bytes in one thread",
            f"{m['ratio']:.2f}x ({m['ours']:.0f} vs {m['peer']:.0f} MB/s)", m["ratio"] >= 0.8)
    for r in _find(rows, "mongodb", "upload", concurrency=1):
        m = r["metrics"]["mb_s"]
        add(f"mongodb: single-stream upload ({_method(r)}) >= 0.9x the raw driver's upload_from_stream",
            f"{m['ratio']:.2f}x", m["ratio"] >= 0.9)
    for r in _find(rows, None, "upload_rss"):
        mb = r["ours_rss_peak_mb_max"]
        add(f"{r['backend']}: service RSS < 150 MB while {r['point']['concurrency']} clients upload "
            f"{r['point']['size_mb']} MB each", f"peak {mb:.0f} MB (at start {r['ours_rss_start_mb']:.0f} MB)",
            mb < 150, "" if r["point"]["size_mb"] >= 1000 else f"measured with a {r['point']['size_mb']} MB file")
    ours_err = sum(r["errors"] for r in records if r["side"] == "ours")
    peer_err = sum(r["errors"] for r in records if r["side"] == "peer")
    ours_req = sum(r["requests"] for r in records if r["side"] == "ours")
    ours_ver = sum(r["verified"] for r in records if r["side"] == "ours")
    add("zero errors and zero checksum mismatches in every scenario",
        f"service: {ours_err} errors in {ours_req} requests, {ours_ver} bodies verified; peers: {peer_err} errors",
        ours_err == 0 and peer_err == 0)
    return out


# -- summary.md --------------------------------------------------------------------------------------------


def _f(v, fmt="{:.0f}", none="–") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _x(v) -> str:
    return _f(v, "{:.2f}x")


def _rng(m: dict, side: str, fmt="{:.0f}") -> str:
    """median (min–max) over rounds."""
    if not m or not _num(m.get(side)):
        return "–"
    return f"{fmt.format(m[side])} ({fmt.format(m[side + '_min'])}–{fmt.format(m[side + '_max'])})"


class Md:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def p(self, text: str = "") -> None:
        self.lines.append(text)

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        if not rows:
            return
        self.p("| " + " | ".join(head) + " |")
        self.p("|" + "|".join(" --- " for _ in head) + "|")
        for r in rows:
            self.p("| " + " | ".join(r) + " |")
        self.p()


def _ratios_only(meta: dict, backend: str) -> bool:
    env = meta["environment"]
    return backend == "mongodb" and (env.get("mongodb") or "").startswith("FerretDB")


def _method(r: dict) -> str:
    m = r["point"].get("method", "PUT")
    return "PUT" if m == "PUT" else "session (32 MiB PATCHes, PUT ?digest=)"


def _err(r: dict) -> str:
    return f"{r['ours_errors']}/{r['peer_errors']}"


def write_summary(out: Path, meta: dict, rows: list[dict], tgts: list[dict], runs: list[dict], failures: list[str],
                  notes: list[str], charts: list[str]) -> str:
    md = Md()
    env = meta["environment"]
    o = meta["options"]
    md.p(f"# Bench results {meta['started']}")
    md.p()
    md.p(f"`{meta['command']}` — {meta['elapsed_s'] / 60:.1f} min. Service at `{env['git_head'][:10]}`"
         f"{' plus ' + str(env['git_dirty_files']) + ' uncommitted changes' if env['git_dirty_files'] else ''}; "
         f"{env['cpus']} × {env['cpu_model']}, {env['memory_gib']} GiB, Linux {env['kernel']}, Python {env['python']}; "
         f"nginx {env['nginx']}; {env['wrk']}"
         + (f"; MongoDB: {env['mongodb']}" if env.get("mongodb") else "") + ".")
    md.p()
    md.p(f"Each figure is the median of {o['rounds']} rounds (min–max in brackets); in every round ours and the peer "
         "ran back to back, alternating which went first, and **ratio = median of the per-round ratios ours/peer**. "
         "Load comes from a separate client process (a lean asyncio client that memcmp-verifies every body byte "
         "against the source file for downloads, aiohttp for uploads, wrk for metadata); the service's memory "
         "(peak RSS over its whole process tree) and CPU time are sampled from outside. MB = 10⁶ bytes. "
         "TTFB = time from starting the request to the first *body* byte. Errors are shown as ours/peer.")
    md.p()
    md.p("## Targets")
    md.p()
    md.table(["target", "figure (median of rounds)", "result"],
             [[t["target"], t["figure"] + (f" — {t['note']}" if t["note"] else ""),
               "info" if t["met"] is None else "**met**" if t["met"] else "**MISSED**"] for t in tgts])
    for backend in meta["options"]["backends"]:
        brows = [r for r in rows if r["backend"] == backend]
        if not brows:
            continue
        ratios = _ratios_only(meta, backend)
        small, large = meta["sizes"][backend]
        if backend == "embedded":
            md.p("## Embedded backend — peer: nginx serving the same bytes from disk with sendfile")
        else:
            md.p("## MongoDB backend — peer: raw PyMongo async GridFS on the same server and database")
            if ratios:
                md.p()
                md.p(f"On the FerretDB test server (SQLite; every chunk query scans the chunks collection in memory), "
                     f"so only ratios to the raw driver are reported; absolute figures are in results.json. "
                     f"Files: {small / 1e6:g} MB and {large / 1e6:g} MB; ranges on the "
                     f"{meta['range_file'][backend] / 1e6:g} MB file so that the scenario finishes. "
                     "A fresh database for every scenario.")
        md.p()
        _section_tables(md, brows, backend, ratios)
    md.p("## Scenario runs")
    md.p()
    md.table(["backend", "scenario", "outcome", "measurements", "seconds"],
             [[r["backend"], r["scenario"], r["outcome"], str(r["records"]), str(r["seconds"])] for r in runs])
    if notes or failures:
        md.p("## Notes and problems")
        md.p()
        for n in dict.fromkeys(notes):
            md.p(f"- {n}")
        for f in failures:
            md.p(f"- FAILURE: {f}")
        md.p()
    if charts:
        md.p("## Charts")
        md.p()
        for c in charts:
            md.p(f"![{c}]({c})")
        md.p()
    text = "\n".join(md.lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _section_tables(md: Md, rows: list[dict], backend: str, ratios: bool) -> None:
    peer = "nginx" if backend == "embedded" else "driver"

    def rows_of(s):
        return [r for r in rows if r["scenario"] == s]

    def tput_cols(r, key="mb_s"):
        m = r["metrics"].get(key, {})
        if ratios:
            return [_x(m.get("ratio"))]
        return [_rng(m, "ours"), _rng(m, "peer"), _x(m.get("ratio"))]

    tput_head = (["ours/driver"] if ratios else ["ours MB/s", f"{peer} MB/s", f"ours/{peer}"])
    rss = lambda r: _f(r["ours_rss_peak_mb_max"], "{:.0f} MB")  # noqa: E731
    cpu = lambda r: (f"{_f(r['ours_cpu_s_per_gb'], '{:.2f}')} / {_f(r['peer_cpu_s_per_gb'], '{:.2f}')}")  # noqa: E731

    if rows_of("single"):
        md.p("### 1. Single-stream download")
        md.p()
        head = (["file", "downloads per round", *tput_head, "peak RSS"]
                + ([] if ratios else [f"CPU s/GB ours / {peer}"]) + ["errors"])
        md.table(head, [[f"{r['point']['size_mb']} MB", str(r["point"].get("downloads", 1)), *tput_cols(r), rss(r)]
                        + ([] if ratios else [cpu(r)]) + [_err(r)] for r in rows_of("single")])
    if rows_of("concurrent"):
        size = rows_of("concurrent")[0]["point"]["size_mb"]
        md.p(f"### 2. Concurrent downloads of the {size} MB file")
        md.p()
        per = {}
        for r in rows_of("concurrent"):
            per.setdefault(r["point"].get("batches", 1), set()).add(r["point"]["concurrency"])
        if set(per) != {1}:
            md.p("Each round runs its clients' downloads in batches back to back, the same for ours and the peer ("
                 + "; ".join(f"{'/'.join(map(str, sorted(cs)))} client{'s' if max(cs) > 1 else ''}: "
                             f"{n} batch{'es' if n > 1 else ''}" for n, cs in sorted(per.items(), reverse=True))
                 + "), so that a round moves about 2 GB.")
            md.p()
        if ratios:
            head = ["workers", "clients", "aggregate ours/driver", "TTFB p50 ours/driver", "TTFB p99 ours/driver",
                    "completion p50 ours/driver", "completion p99 ours/driver", "peak RSS", "errors"]
            body = [[str(r["point"]["workers"]), str(r["point"]["concurrency"]), _x(r["metrics"]["mb_s"]["ratio"]),
                     _x(r["metrics"]["ttfb_p50_ms"]["ratio"]), _x(r["metrics"]["ttfb_p99_ms"]["ratio"]),
                     _x(r["metrics"]["total_p50_s"]["ratio"]), _x(r["metrics"]["total_p99_s"]["ratio"]),
                     rss(r), _err(r)] for r in rows_of("concurrent")]
        else:
            head = ["workers", "clients", "ours MB/s", "nginx MB/s", "ours/nginx", "TTFB p50/p99 ours (ms)",
                    "TTFB p50/p99 nginx (ms)", "completion p50/p99 ours (s)", "completion p50/p99 nginx (s)",
                    "peak RSS", "CPU s/GB ours / nginx", "errors"]
            body = []
            for r in rows_of("concurrent"):
                m = r["metrics"]
                body.append([str(r["point"]["workers"]), str(r["point"]["concurrency"]), _rng(m["mb_s"], "ours"),
                             _rng(m["mb_s"], "peer"), _x(m["mb_s"]["ratio"]),
                             f"{_f(m['ttfb_p50_ms']['ours'], '{:.1f}')} / {_f(m['ttfb_p99_ms']['ours'], '{:.1f}')}",
                             f"{_f(m['ttfb_p50_ms']['peer'], '{:.1f}')} / {_f(m['ttfb_p99_ms']['peer'], '{:.1f}')}",
                             f"{_f(m['total_p50_s']['ours'], '{:.2f}')} / {_f(m['total_p99_s']['ours'], '{:.2f}')}",
                             f"{_f(m['total_p50_s']['peer'], '{:.2f}')} / {_f(m['total_p99_s']['peer'], '{:.2f}')}",
                             rss(r), cpu(r), _err(r)])
        md.table(head, body)
    if rows_of("ranges") or rows_of("ttfb"):
        md.p("### 3. Random 1 MiB ranges")
        md.p()
        for r in rows_of("ranges"):
            m = r["metrics"]
            md.p(f"{r['point']['size_mb']} MB file, {r['point']['concurrency']} keep-alive connections, "
                 f"{r['ours_requests']} requests to the service over all rounds.")
            md.p()
            if ratios:
                md.table(["req/s ours/driver", "p50 latency ours/driver", "p99 latency ours/driver", "peak RSS",
                          "errors"], [[_x(m["req_s"]["ratio"]), _x(m["lat_p50_ms"]["ratio"]),
                                       _x(m["lat_p99_ms"]["ratio"]), rss(r), _err(r)]])
            else:
                md.table(["ours req/s", "nginx req/s", "ours/nginx", "p50 / p99 latency ours (ms)",
                          "p50 / p99 latency nginx (ms)", "peak RSS", "errors"],
                         [[_rng(m["req_s"], "ours"), _rng(m["req_s"], "peer"), _x(m["req_s"]["ratio"]),
                           f"{_f(m['lat_p50_ms']['ours'], '{:.2f}')} / {_f(m['lat_p99_ms']['ours'], '{:.2f}')}",
                           f"{_f(m['lat_p50_ms']['peer'], '{:.2f}')} / {_f(m['lat_p99_ms']['peer'], '{:.2f}')}",
                           rss(r), _err(r)]])
        for r in rows_of("ttfb"):
            m = r["metrics"]
            md.p(f"Time to first byte of a 1 MiB range at offset 0 and at 90% of the {r['point']['size_mb']} MB file "
                 "(one keep-alive connection, alternating, medians):")
            md.p()
            if ratios:
                md.table(["ours: TTFB 90% / TTFB 0", "driver: TTFB 90% / TTFB 0", "ours/driver at 0",
                          "ours/driver at 90%", "errors"],
                         [[_x(m["ttfb_90_over_0"]["ours"]), _x(m["ttfb_90_over_0"]["peer"]),
                           _x(m["ttfb_at_0_ms"]["ratio"]), _x(m["ttfb_at_90_ms"]["ratio"]), _err(r)]])
            else:
                md.table(["", "TTFB at 0 (ms)", "TTFB at 90% (ms)", "90% / 0"],
                         [["ours", _f(m["ttfb_at_0_ms"]["ours"], "{:.2f}"), _f(m["ttfb_at_90_ms"]["ours"], "{:.2f}"),
                           _x(m["ttfb_90_over_0"]["ours"])],
                          ["nginx", _f(m["ttfb_at_0_ms"]["peer"], "{:.2f}"), _f(m["ttfb_at_90_ms"]["peer"], "{:.2f}"),
                           _x(m["ttfb_90_over_0"]["peer"])]])
    if rows_of("segmented"):
        md.p("### 4. Segmented download (8 parallel ranges, assembled, sha256 verified)")
        md.p()
        md.table(["file", *tput_head, "peak RSS", "errors"],
                 [[f"{r['point']['size_mb']} MB", *tput_cols(r), rss(r), _err(r)] for r in rows_of("segmented")])
    if rows_of("upload"):
        md.p("### 5. Upload (distinct content per upload; the service checks X-Checksum-Sha256)")
        md.p()
        md.p("Peer: " + ("nginx's WebDAV PUT to a file (no hashing, no fsync; its file is sha256-checked afterwards)."
                         if backend == "embedded" else
                         "PyMongo async GridFSBucket.upload_from_stream of the same bytes with the same chunk size "
                         "(length and chunk count checked)."))
        md.p()
        md.table(["upload", "concurrent uploads", *tput_head, "peak RSS", "errors"],
                 [[_method(r), str(r["point"]["concurrency"]), *tput_cols(r), rss(r), _err(r)]
                  for r in rows_of("upload")])
    if rows_of("upload_hashlib"):
        md.p("#### Single-stream upload against hashlib.sha256 of the same bytes in one thread")
        md.p()
        md.p("Peer: one `hashlib.sha256` update over the same bytes (the mapped file), in a client process: the "
             "speed an upload that must hash every byte could reach if nothing else cost anything.")
        md.p()
        md.table(["upload", "ours MB/s", "hashlib MB/s", "ours/hashlib", "peak RSS", "errors"],
                 [[_method(r), _rng(r["metrics"]["mb_s"], "ours"), _rng(r["metrics"]["mb_s"], "peer"),
                   _x(r["metrics"]["mb_s"]["ratio"]), rss(r), _err(r)] for r in rows_of("upload_hashlib")])
    if rows_of("upload_rss"):
        md.p("#### Memory while many clients upload")
        md.p()
        md.table(["upload", "concurrent uploads", "file", "aggregate MB/s", "peak RSS (at start)", "errors"],
                 [[_method(r), str(r["point"]["concurrency"]), f"{r['point']['size_mb']} MB",
                   _f(r["metrics"]["mb_s"]["ours"]),
                   f"{rss(r)} ({_f(r['ours_rss_start_mb'], '{:.0f} MB')})", _err(r)] for r in rows_of("upload_rss")])
    if rows_of("metadata"):
        first = rows_of("metadata")[0]["point"]
        md.p(f"### 6. Metadata (registry of {first['models']} models, {first.get('connections', 16)} connections, "
             f"wrk)")
        md.p()
        md.p("Peer: " + ("nginx serving a static copy of the same JSON answers (the HTTP ceiling for such a response)."
                         if backend == "embedded" else "the same query through the raw driver, as many at a time."))
        md.p()
        if ratios:
            md.table(["workers", "request", "req/s ours/driver", "p99 latency ours/driver", "peak RSS", "errors"],
                     [[str(r["point"]["workers"]), r["point"]["op"], _x(r["metrics"]["req_s"]["ratio"]),
                       _x(r["metrics"]["lat_p99_ms"]["ratio"]), rss(r), _err(r)] for r in rows_of("metadata")])
        else:
            md.table(["workers", "request", "ours req/s", f"{peer} req/s", f"ours/{peer}", "p50 / p99 ours (ms)",
                      "peak RSS", "errors"],
                     [[str(r["point"]["workers"]), r["point"]["op"], _rng(r["metrics"]["req_s"], "ours"),
                       _rng(r["metrics"]["req_s"], "peer"), _x(r["metrics"]["req_s"]["ratio"]),
                       f"{_f(r['metrics']['lat_p50_ms']['ours'], '{:.1f}')} / "
                       f"{_f(r['metrics']['lat_p99_ms']['ours'], '{:.1f}')}", rss(r), _err(r)]
                      for r in rows_of("metadata")])
    if rows_of("floors"):
        md.p("### Per-request cost: the framework's floor and nginx")
        md.p()
        md.p("`floor`: bench/floor.py, a bare aiohttp handler on uvloop returning the service's own bytes "
             "pre-serialized. req/s and p99 from wrk; the TTFB row: one download at a time, each on a new connection.")
        md.p()

        def fig(r, key, side, fmt):
            return _f(r["metrics"].get(key, {}).get(side), fmt)

        md.table(["request", "peer", "ours req/s", "peer req/s", "ours/peer", "p99 ours / peer (ms)",
                  "TTFB p50 ours / peer (ms)", "errors"],
                 [[r["point"]["op"], r["peer_who"] or r["point"]["peer"], fig(r, "req_s", "ours", "{:.0f}"),
                   fig(r, "req_s", "peer", "{:.0f}"), _x(r["metrics"].get("req_s", {}).get("ratio")),
                   f"{fig(r, 'lat_p99_ms', 'ours', '{:.1f}')} / {fig(r, 'lat_p99_ms', 'peer', '{:.1f}')}",
                   f"{fig(r, 'ttfb_p50_ms', 'ours', '{:.2f}')} / {fig(r, 'ttfb_p50_ms', 'peer', '{:.2f}')}"
                   + (f" = {_x(r['metrics']['ttfb_p50_ms']['ratio'])}" if "ttfb_p50_ms" in r["metrics"] else ""),
                   _err(r)] for r in rows_of("floors")])
    if rows_of("chunksize"):
        md.p("### GRIDFS_CHUNK_SIZE")
        md.p()
        md.p("Each chunk size on a fresh database; the driver peer reads the same file (so the same chunks) and "
             "writes with the same chunk size.")
        md.p()
        md.table(["GRIDFS_CHUNK_SIZE", "stored chunk", "operation", *tput_head, "peak RSS", "errors"],
                 [[f"{r['point']['chunk_kib']} KiB", f"{r['point']['effective_chunk_kib']} KiB", r["point"]["op"],
                   *tput_cols(r), rss(r), _err(r)] for r in rows_of("chunksize")])
    if rows_of("replicas"):
        md.p("### Replicas behind nginx (one database)")
        md.p()
        md.p("Separate service processes on one database, nginx round-robin in front, measured through nginx; "
             "ratios to one replica. Everything shares this machine's cores, so the ratios show the cost of "
             "coordination between replicas, not a speed-up (see the note below).")
        md.p()

        def figure(r):
            return r["metrics"]["mb_s" if r["point"]["op"].startswith("download") else "req_s"]["ours"]
        one = {r["point"]["op"]: figure(r) for r in rows_of("replicas") if r["point"]["replicas"] == 1}
        md.table(["replicas", "operation", "MB/s or req/s", "ratio to one replica", "errors"],
                 [[str(r["point"]["replicas"]), r["point"]["op"], _f(figure(r), "{:.1f}"),
                   _x(figure(r) / one[r["point"]["op"]]) if one.get(r["point"]["op"]) else "–", _err(r)]
                  for r in sorted(rows_of("replicas"), key=lambda r: (r["point"]["op"], r["point"]["replicas"]))])
    if rows_of("aiohttp_client"):
        md.p("### Client check: single stream through aiohttp's client instead of the lean one")
        md.p()
        md.table(["file", *tput_head, "client CPU busy (max)", "errors"],
                 [[f"{r['point']['size_mb']} MB", *tput_cols(r),
                   f"ours {_f(r['ours_client_busy_max'], '{:.0%}')}, nginx {_f(r['peer_client_busy_max'], '{:.0%}')}",
                   _err(r)] for r in rows_of("aiohttp_client")])


# -- charts -------------------------------------------------------------------------------------------------


def charts(out: Path, meta: dict, rows: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for backend in meta["options"]["backends"]:
        conc = [r for r in rows if r["backend"] == backend and r["scenario"] == "concurrent"]
        if not conc:
            continue
        ratios = _ratios_only(meta, backend)
        peer = "nginx" if backend == "embedded" else "PyMongo GridFS"
        workers = sorted({r["point"]["workers"] for r in conc})
        size = conc[0]["point"]["size_mb"]
        colors = {1: "tab:blue", 2: "tab:orange", 3: "tab:green", 4: "tab:red"}

        # Throughput against concurrency.
        fig, ax = plt.subplots(figsize=(8, 5))
        for w in workers:
            rs = sorted([r for r in conc if r["point"]["workers"] == w], key=lambda r: r["point"]["concurrency"])
            xs = [r["point"]["concurrency"] for r in rs]
            col = colors.get(w, None)
            if ratios:
                ax.plot(xs, [r["metrics"]["mb_s"]["ratio"] for r in rs], "o-", color=col,
                        label=f"ours ({w} worker{'s' * (w > 1)}) / raw driver")
            else:
                m = [r["metrics"]["mb_s"] for r in rs]
                ax.errorbar(xs, [v["ours"] for v in m], yerr=_err_bars(m, "ours"), fmt="o-", color=col, capsize=3,
                            label=f"ours, {w} worker{'s' * (w > 1)}")
                if backend == "embedded":
                    ax.errorbar(xs, [v["peer"] for v in m], yerr=_err_bars(m, "peer"), fmt="s--", color=col,
                                alpha=0.6, capsize=3, label=f"nginx, {w} worker{'s' * (w > 1)}")
                elif w == workers[0]:
                    ax.errorbar(xs, [v["peer"] for v in m], yerr=_err_bars(m, "peer"), fmt="s--", color="gray",
                                capsize=3, label=peer)
        if ratios:
            ax.axhline(0.9, color="red", linestyle=":", label="target 0.9x")
            ax.set_ylabel("aggregate throughput, ours / raw driver")
        else:
            ax.set_ylabel("aggregate throughput (MB/s)")
            ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["point"]["concurrency"] for r in conc}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"concurrent clients (each downloads the whole {size} MB file)")
        ax.set_title(f"{backend}: download throughput against concurrency\n(median of {meta['options']['rounds']} "
                     + ("per-round ratios)" if ratios else "rounds, bars min–max)"), fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        name = f"throughput_{backend}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

        # Latency percentiles against concurrency (first worker count).
        w0 = workers[0]
        rs = sorted([r for r in conc if r["point"]["workers"] == w0], key=lambda r: r["point"]["concurrency"])
        xs = [r["point"]["concurrency"] for r in rs]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, (p50, p99, title, scale, unit) in zip(axes, [
            ("ttfb_p50_ms", "ttfb_p99_ms", "time to first body byte", 1, "ms"),
            ("total_p50_s", "total_p99_s", "completion time", 1, "s"),
        ]):
            if ratios:
                ax.plot(xs, [r["metrics"][p50]["ratio"] for r in rs], "o-", label="p50 ours/driver")
                ax.plot(xs, [r["metrics"][p99]["ratio"] for r in rs], "s-", label="p99 ours/driver")
                ax.axhline(1.0, color="gray", linestyle=":")
                ax.set_ylabel("ours / raw driver (lower is better)")
            else:
                for key, style in ((p50, "o"), (p99, "s")):
                    q = key.split("_")[1]
                    ax.plot(xs, [r["metrics"][key]["ours"] for r in rs], style + "-", color="tab:blue",
                            alpha=1 if q == "p99" else 0.6, label=f"{q} ours")
                    ax.plot(xs, [r["metrics"][key]["peer"] for r in rs], style + "--", color="tab:gray",
                            alpha=1 if q == "p99" else 0.6, label=f"{q} {peer}")
                ax.set_yscale("log")
                ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrent clients")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{backend}: latency percentiles, {size} MB downloads, {w0} worker{'s' * (w0 > 1)}")
        fig.tight_layout()
        name = f"latency_{backend}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

        # Peak service memory against concurrency.
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for w in workers:
            rs = sorted([r for r in conc if r["point"]["workers"] == w], key=lambda r: r["point"]["concurrency"])
            ax.plot([r["point"]["concurrency"] for r in rs], [r["ours_rss_peak_mb_max"] for r in rs], "o-",
                    color=colors.get(w), label=f"{w} worker{'s' * (w > 1)} (whole process tree)")
            if w > 1:
                ax.plot([r["point"]["concurrency"] for r in rs], [r["ours_rss_peak_process_mb_max"] for r in rs],
                        "o--", color=colors.get(w), alpha=0.6, label=f"{w} workers (largest single process)")
        ax.axhline(150, color="red", linestyle=":", label="target 150 MB")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["point"]["concurrency"] for r in conc}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("peak RSS of the service (MB)")
        ax.set_title(f"{backend}: service memory during concurrent {size} MB downloads")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"memory_{backend}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

        # Range latency percentiles.
        rng = [r for r in rows if r["backend"] == backend and r["scenario"] == "ranges"]
        if rng:
            m = rng[0]["metrics"]
            fig, ax = plt.subplots(figsize=(7, 4.5))
            qs = ["lat_p50_ms", "lat_p90_ms", "lat_p99_ms"]
            labels = ["p50", "p90", "p99"]
            if ratios:
                ax.bar(labels, [m[q]["ratio"] for q in qs], color="tab:blue")
                ax.axhline(1.0, color="gray", linestyle=":")
                ax.set_ylabel("latency ours / raw driver")
            else:
                import numpy as np

                x = np.arange(len(qs))
                ax.bar(x - 0.2, [m[q]["ours"] for q in qs], 0.4, label="ours")
                ax.bar(x + 0.2, [m[q]["peer"] for q in qs], 0.4, label=peer, color="tab:gray")
                ax.set_xticks(x, labels)
                ax.set_ylabel("latency of a 1 MiB range (ms)")
                ax.legend()
            ax.set_title(f"{backend}: random 1 MiB ranges of the {rng[0]['point']['size_mb']} MB file, "
                         f"{rng[0]['point']['concurrency']} connections")
            ax.grid(True, axis="y", alpha=0.3)
            fig.tight_layout()
            name = f"ranges_{backend}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def _err_bars(ms: list[dict], side: str):
    lo = [max(0.0, m[side] - m[side + "_min"]) if _num(m.get(side)) else 0 for m in ms]
    hi = [max(0.0, m[side + "_max"] - m[side]) if _num(m.get(side)) else 0 for m in ms]
    return [lo, hi]


def _log_errors(logs: Path) -> list[str]:
    """ERROR lines the service logged during the run, with the exception that ended each traceback."""
    found = []
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        lines = log.read_text(errors="replace").splitlines()
        errors = [i for i, line in enumerate(lines) if " ERROR " in line]
        if not errors:
            continue
        first = lines[errors[0]].split(" ERROR ", 1)[1][:200]
        cause = next((line for line in lines[errors[0] + 1:] if line and not line.startswith((" ", "Traceback"))), "")
        found.append(f"service log {log.name}: {len(errors)} ERROR line(s); first: {first}"
                     + (f" — {cause[:300]}" if cause else ""))
    return found


def write(out: Path, meta: dict, records: list[dict], runs: list[dict], failures: list[str], notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    notes = [*notes, *_log_errors(out / "logs")]
    rows = aggregate(records)
    tgts = targets(rows, records, meta)
    made = charts(out, meta, rows)
    (out / "results.json").write_text(json.dumps({
        "meta": meta, "targets": tgts, "summary": rows, "scenario_runs": runs, "failures": failures,
        "notes": list(dict.fromkeys(notes)), "records": records, "charts": made,
    }, indent=1, default=str))
    write_summary(out, meta, rows, tgts, runs, failures, notes, made)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report DIR``: render summary.md and the charts again from DIR/results.json."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    data = json.loads((out / "results.json").read_text())
    notes = [n for n in data.get("notes", []) if not n.startswith("service log ")]
    write(out, data["meta"], data["records"], data["scenario_runs"], data["failures"], notes)
    print(out / "summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
