"""A self-contained HTML report of a refinement run: counts, histograms, contact sheets.

Written to the dataset's report folder (`RefinedDataset.report_index`) with its PNGs
beside it; viewable offline.
"""

from __future__ import annotations

import html
import io

import cv2
import numpy as np

from dataset import shards, storage
from dataset.refined import RefinedDataset

SHEET_COLS, SHEET_MAX = 8, 24


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


# A report shows thumbnails: what it decodes is capped (rejects hold raw bytes of any image,
# decompression bombs included), and only formats stage 1 accepts are decoded at all.
THUMBNAIL_MAX_PIXELS = 4_000_000


def decode_thumbnail_source(data: bytes | None) -> np.ndarray | None:
    """BGR pixels of an image to show, or None when it is empty, not an accepted format, or
    larger than THUMBNAIL_MAX_PIXELS (judged on its header, before any decoding)."""
    from cleaning.steps import ACCEPTED_FORMATS, sniff_image

    if not data:
        return None
    sniffed = sniff_image(data)
    if sniffed is None or sniffed[0] not in ACCEPTED_FORMATS or sniffed[1][0] * sniffed[1][1] > THUMBNAIL_MAX_PIXELS:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def contact_sheet(images: list[bytes], tile: int = 112) -> bytes | None:
    tiles = []
    for data in images[:SHEET_MAX]:
        img = decode_thumbnail_source(data)
        if img is None:
            img = np.full((tile, tile, 3), 40, np.uint8)
            cv2.putText(img, "no image", (10, tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (200, 200, 200), 1)
        tiles.append(cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA))
    if not tiles:
        return None
    while len(tiles) % SHEET_COLS and len(tiles) > SHEET_COLS:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + SHEET_COLS]) for i in range(0, len(tiles), SHEET_COLS)]
    ok, buf = cv2.imencode(".png", np.vstack(rows))
    return buf.tobytes() if ok else None


def write_report(ds: RefinedDataset) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = ds.manifest.to_dict()
    reject_files = ds.reject_uris()
    shard_files = ds.shard_uris()
    # Figures for every row, pixels only for the rows shown.
    rejects = [shards.read_table(u, ["reason", "blur", "det_score"]) for u in reject_files]
    kept = [shards.read_table(u, ["blur", "det_score"]) for u in shard_files]

    sections = []
    # Histograms of the quality figures, kept vs rejected.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, col in zip(axes, ("blur", "det_score")):
        k = np.concatenate([t.column(col).to_numpy(zero_copy_only=False) for t in kept]) if kept else np.array([])
        r = np.concatenate([t.column(col).to_numpy(zero_copy_only=False) for t in rejects]) if rejects else np.array([])
        k, r = k[np.isfinite(k)], r[np.isfinite(r)]
        bins = 40
        if len(k):
            ax.hist(k, bins=bins, alpha=0.6, label=f"kept ({len(k)})")
        if len(r):
            ax.hist(r, bins=bins, alpha=0.6, label=f"rejected ({len(r)})")
        ax.set_title(col)
        if len(k) or len(r):
            ax.legend()
    storage.write_bytes(ds.report_file("quality.png"), figure_png(fig))
    plt.close(fig)
    sections.append('<h2>Quality figures</h2><img src="quality.png" alt="quality histograms">')

    # Contact sheets: what was dropped, per reason, next to kept faces.
    shown: dict[str, list[tuple[int, int]]] = {}  # reason -> (reject file, row) shown
    for f, t in enumerate(rejects):
        for row, reason in enumerate(t.column("reason").to_pylist()):
            lst = shown.setdefault(reason, [])
            if len(lst) < SHEET_MAX:
                lst.append((f, row))
    by_reason = {reason: _images_at(reject_files, rows) for reason, rows in shown.items()}
    sheets = []
    for reason, images in sorted(by_reason.items()):
        png = contact_sheet(images)
        if png:
            name = f"rejected_{reason}.png"
            storage.write_bytes(ds.report_file(name), png)
            sheets.append(f"<h3>{html.escape(reason)}</h3><img src=\"{name}\" alt=\"{html.escape(reason)}\">")
    if kept and kept[0].num_rows:
        png = contact_sheet(_images_at(shard_files, [(0, r) for r in range(min(SHEET_MAX, kept[0].num_rows))]))
        storage.write_bytes(ds.report_file("kept_sample.png"), png)
        sheets.insert(0, '<h3>kept (sample)</h3><img src="kept_sample.png" alt="kept faces">')
    sections.append("<h2>Contact sheets</h2>" + "".join(sheets))

    c = manifest["counts"]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in c["by_reason"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Refinement report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}} td,th{{padding:2px 10px;border-bottom:1px solid #ddd}}
img{{max-width:100%}}</style></head><body>
<h1>Refinement report: {html.escape(manifest['stage'])}</h1>
<p>Source: {html.escape(manifest['source']['format'])} at <code>{html.escape(manifest['source']['uri'])}</code><br>
Content hash: <code>{manifest['content_hash'][:16]}</code></p>
<table><tr><th>read</th><th>kept</th><th>rejected</th><th>identities</th></tr>
<tr><td>{c['read']}</td><td>{c['kept']}</td><td>{c['rejected']}</td><td>{manifest['num_classes']}</td></tr></table>
<h2>Rejected, by stage and reason</h2><table><tr><th>stage/reason</th><th>count</th></tr>{rows}</table>
{''.join(sections)}
</body></html>"""
    storage.write_bytes(ds.report_index, page.encode())
    return ds.report_index


def _images_at(uris: list[str], rows: list[tuple[int, int]]) -> list[bytes]:
    """The `image` cells at (file index, row), in that order: only the row groups holding
    those rows are read (a rejects file may hold a thousand raw photos)."""
    import pyarrow.parquet as pq

    by_file: dict[int, list[int]] = {}
    for f, r in rows:
        by_file.setdefault(f, []).append(r)
    cells = {}
    for f, rs in by_file.items():
        fs, path = storage.resolve(uris[f])
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            for g in sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rs}):
                images = pf.read_row_group(g, columns=["image"]).column("image")
                for r in rs:
                    if starts[g] <= r < starts[g + 1]:
                        cells[(f, r)] = images[r - int(starts[g])].as_py()
    return [cells[key] for key in rows]


# -- stage 2 ----------------------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _rows_images(shard_uris: list[str], sizes: list[int], rows: list[int]) -> dict[int, bytes]:
    """Image bytes of the given global rows of a dataset, reading only the shards they are in."""
    import pyarrow as pa

    starts = np.cumsum([0] + sizes[:-1])
    wanted: dict[int, list[int]] = {}
    for r in sorted(set(rows)):
        s = int(np.searchsorted(starts, r, side="right") - 1)
        wanted.setdefault(s, []).append(r)
    out = {}
    for s, rs in wanted.items():
        table = shards.read_table(shard_uris[s], ["image"])
        local = [r - int(starts[s]) for r in rs]
        for r, img in zip(rs, table.take(pa.array(local)).column("image").to_pylist()):
            out[r] = img
    return out


def identity_sheet(rows: list[tuple[list[bytes], list[bytes]]], tile: int = 96, per_side: int = 4) -> bytes | None:
    """One line per identity: its dropped faces (red frame) | its most typical kept faces."""
    def tiles(images, colour):
        out = []
        for data in images[:per_side]:
            img = decode_thumbnail_source(data)
            img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA) if img is not None else \
                np.full((tile, tile, 3), 40, np.uint8)
            out.append(cv2.copyMakeBorder(img[3:-3, 3:-3], 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=colour))
        while len(out) < per_side:
            out.append(np.full((tile, tile, 3), 255, np.uint8))
        return out

    lines = [np.hstack(tiles(d, (0, 0, 220)) + [np.full((tile, 12, 3), 255, np.uint8)] + tiles(t, (0, 160, 0)))
             for d, t in rows]
    if not lines:
        return None
    ok, buf = cv2.imencode(".png", np.vstack(lines))
    return buf.tobytes() if ok else None


def write_denoise_report(ds: RefinedDataset, embedded, identities_per_reason: int = 8) -> str:
    """`<out>/report/index.html`: one self-contained page (PNGs inline, also written beside
    it): counts per stage and reason, the sample-to-centre angles with the threshold, and
    per reason the dropped faces next to their identity's most typical faces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = ds.manifest.to_dict()
    s2 = manifest["stage2"]
    parent = ds.parent()
    parent_uri = parent.uri
    parent_shards = parent.shard_uris()
    sizes = [pq_rows(u) for u in parent_shards]
    figures: dict[str, bytes] = {}

    h = s2["angle_histogram"]
    edges = np.array(h["edges_deg"])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(edges[:-1], h["kept"], width=np.diff(edges), align="edge", alpha=0.7, label="kept")
    ax.bar(edges[:-1], h["dropped"], width=np.diff(edges), align="edge", alpha=0.7, label="dropped: far from centre",
           color="tab:red")
    ax.bar(edges[:-1], h["dropped_other_reasons"], width=np.diff(edges), align="edge", alpha=0.7,
           label="dropped: other reasons (overlap, small)", color="tab:grey")
    ax.axvline(h["threshold_deg"], color="k", ls="--", label=f"threshold {h['threshold_deg']:g} deg")
    ax.set_yscale("symlog")
    ax.set_xlabel("angle between a face and its identity centre (degrees)")
    ax.set_ylabel("faces")
    ax.legend()
    figures["angles.png"] = figure_png(fig)
    plt.close(fig)

    # Per reason: a few identities, their dropped faces beside their most typical kept faces.
    kept = embedded.kept
    angles = np.where(np.isfinite(embedded.angles), embedded.angles, 180.0)
    by_group_kept: dict[int, np.ndarray] = {}
    order = np.lexsort((angles, embedded.groups))
    for g in np.unique(embedded.groups):
        rows = order[np.searchsorted(embedded.groups[order], g, "left"):np.searchsorted(embedded.groups[order], g, "right")]
        by_group_kept[int(g)] = rows[kept[rows]][:4]
    sheets_plan: dict[str, list[tuple[list[int], list[int]]]] = {}
    reasons = embedded.reasons
    for reason in sorted({r for r in reasons if r is not None}):
        rows = np.flatnonzero(reasons == reason)
        groups = list(dict.fromkeys(embedded.groups[rows].tolist()))[:identities_per_reason]
        sheets_plan[reason] = [(rows[embedded.groups[rows] == g][:4].tolist(), by_group_kept.get(g, np.array([])).tolist())
                               for g in groups]
    needed = [r for plan in sheets_plan.values() for d, t in plan for r in d + t]
    images = _rows_images(parent_shards, sizes, needed)
    for reason, plan in sheets_plan.items():
        png = identity_sheet([([images[r] for r in d], [images[r] for r in t]) for d, t in plan])
        if png:
            figures[f"dropped_{reason.replace('/', '__')}.png"] = png
    for name, png in figures.items():
        storage.write_bytes(ds.report_file(name), png)

    c = manifest["counts"]
    stage_rows = "".join(
        f"<tr><td>{html.escape(st)}</td><td>{v['read']}</td><td>{v['kept']}</td><td>{v['rejected']}</td></tr>"
        for st, v in c.get("by_stage", {}).items())
    reason_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in c["by_reason"].items())
    merges = "".join(f"<li>{html.escape(', '.join(m['identities']))} &rarr; one identity</li>" for m in s2["merges"]) \
        or "<li>none</li>"
    overlap = s2["steps"].get("evaluation_overlap", {})
    over = ", ".join(overlap.get("identities_by_embedding", []) + overlap.get("identities_by_name", [])) or "none"
    sheets = "".join(
        f"<h3>{html.escape(name[len('dropped_'):-4].replace('__', '/'))}</h3><p>left, red: dropped; right, green: the identity's most "
        f"typical kept faces</p><img src=\"{_data_uri(png)}\" alt=\"{html.escape(name)}\">"
        for name, png in figures.items() if name.startswith("dropped_"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Refinement report: stage 2</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}} td,th{{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Refinement report: stage 2 (de-noising with embeddings)</h1>
<p>Model: <code>{html.escape(s2['model'])}</code><br>Parent: <code>{html.escape(parent_uri)}</code>
(content hash <code>{manifest['parent']['content_hash'][:16]}</code>)<br>
This dataset: content hash <code>{manifest['content_hash'][:16]}</code>, {manifest['num_images']} faces,
{manifest['num_classes']} identities</p>
<h2>Counts per stage</h2><table><tr><th>stage</th><th>read</th><th>kept</th><th>rejected</th></tr>{stage_rows}
<tr><th>all</th><th>{c['read']}</th><th>{c['kept']}</th><th>{c['rejected']}</th></tr></table>
<h2>Rejected, by reason (both stages)</h2><table><tr><th>reason</th><th>faces</th></tr>{reason_rows}</table>
<h2>Angle to the identity centre</h2><img src="{_data_uri(figures['angles.png'])}" alt="angle histogram">
{loop_html(s2.get("loop"))}
{persons_html(s2["steps"].get("intra_class", {}).get("persons"))}
<h2>Identities merged</h2>{same_person_html(s2["steps"].get("intra_class", {}))}<ul>{merges}</ul>
<h2>Identities removed as evaluation people</h2><p>{html.escape(over)}</p>
<h2>Dropped faces</h2>{sheets}
</body></html>"""
    storage.write_bytes(ds.report_index, page.encode())
    return ds.report_index


def loop_html(loop: dict | None) -> str:
    """What `arcface clean-data` chose from the data (the stage-2 manifest's "loop"): each
    bootstrap model's start and length, each round's decision with the figures that made it,
    and the loop's advice when a bootstrap from random weights met heavy noise."""
    if not loop:
        return ""
    boots = "".join(
        f"<tr><td>{i}</td><td>{_started_from(b.get('started_from'))}</td><td>{b['faces']}</td>"
        f"<td>{b['epochs']} (configured {b['configured_epochs']})</td>"
        f"<td>{b['steps']}</td><td>{html.escape(b['rule'])}</td></tr>" for i, b in enumerate(loop["bootstraps"], 1))
    rounds = "".join(
        f"<tr><td>{r['round']}</td><td>{r['threshold_deg']:g} ({html.escape(r['threshold_rule'])})</td>"
        f"<td>{r['share_found']:.3f}</td><td>{r.get('share_beyond_otsu', '-')}</td>"
        f"<td>{r.get('share_set_aside', '-')}</td>"
        f"<td>{html.escape(r['decided_by'])}</td><td>{'yes' if r['another_round'] else 'no'}</td>"
        f"<td>{r['intermediate_cut_deg']:g}</td></tr>" for r in loop["rounds"])
    advice = f"<p><b>Advice:</b> {html.escape(loop['advice'])}</p>" if loop.get("advice") else ""
    return (f"<h2>How the loop chose</h2>{advice}<table><tr><th>bootstrap</th><th>started from</th><th>faces</th>"
            f"<th>epochs</th><th>steps</th>"
            f"<th>rule</th></tr>{boots}</table><table><tr><th>round</th><th>threshold (deg)</th><th>share found</th>"
            f"<th>share beyond Otsu</th><th>share set aside</th><th>decided by</th><th>another round</th>"
            f"<th>its cut (deg)</th></tr>"
            f"{rounds}</table>")


def _started_from(path: str | None) -> str:
    """A bootstrap's start as the loop recorded it: "" random weights; None, a manifest
    written before the loop recorded it."""
    return "-" if path is None else html.escape(path) if path else "random weights"


def persons_html(persons: dict | None) -> str:
    """How each identity's centre was set on its own person (IntraClassOutliers._person_centres,
    in the manifest's intra_class step): the clusters and persons found, and the identities
    moved off their largest person (a look-alike with more faces in its own identity)."""
    if not persons or "clusters" not in persons:
        return ""
    moved = ", ".join(persons["moved_off_their_largest_person"]) or "none"
    more = persons["identities_moved"] - len(persons["moved_off_their_largest_person"])
    return (f"<h2>Each identity's own person</h2><p>{persons['clusters']} tight clusters (cut at "
            f"{persons['cluster_cut_deg']:g} deg) in {persons['persons']} persons; {persons['identities_given_a_person']} "
            f"identities given a person of their own. Moved off their largest person (another identity holds more "
            f"of it): {persons['identities_moved']}: {html.escape(moved)}{f' and {more} more' if more > 0 else ''}. "
            f"Ties between two persons broken by the noise the folders share: "
            f"{persons.get('ties_broken_by_shared_noise', 0)}; identities left without a person that went with the "
            f"person whose folder draws its mislabelled faces from the same people: "
            f"{persons.get('taken_by_noise_sources', 0)}</p>")


def same_person_html(intra: dict) -> str:
    """The angle between underlying centres taken as one person (merges, the nearer-another
    exemption, persons, evaluation people), and where it came from: configured, or derived
    from how far apart this model sets the identities (merge_same_person_angle 0)."""
    if "same_person_angle" not in intra:
        return ""
    source = intra.get("same_person_angle_from", {"rule": "configured"})
    evidence = (f"; the median identity lies {source['median_nearest_identity_deg']:g} deg from its nearest other, "
                f"over {source['identities']} identities" if "median_nearest_identity_deg" in source else "")
    return (f"<p>One person: underlying centres within {intra['same_person_angle']:g} deg "
            f"({html.escape(source['rule'])}{evidence}).</p>")


def pq_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    return pq.read_metadata(path, filesystem=fs).num_rows
