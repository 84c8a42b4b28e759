"""A self-contained HTML report of a refinement run: counts, histograms, contact sheets.

Written to `<out>/report/index.html` with its PNGs beside it; viewable offline.
"""

from __future__ import annotations

import html
import io

import cv2
import numpy as np

from cleaning import shards, storage

SHEET_COLS, SHEET_MAX = 8, 24


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def contact_sheet(images: list[bytes], tile: int = 112) -> bytes | None:
    tiles = []
    for data in images[:SHEET_MAX]:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
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


def write_report(out: str, manifest: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = storage.join(out, "report")
    reject_files = storage.list_files(storage.join(out, "rejects"), suffix=".parquet")
    shard_files = storage.list_files(storage.join(out, "shards"), suffix=".parquet")
    rejects = [shards.read_table(u, ["reason", "image", "blur", "det_score"]) for u in reject_files]
    kept = [shards.read_table(u, ["image", "blur", "det_score", "label"]) for u in shard_files]

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
    storage.write_bytes(storage.join(report, "quality.png"), _png(fig))
    plt.close(fig)
    sections.append('<h2>Quality figures</h2><img src="quality.png" alt="quality histograms">')

    # Contact sheets: what was dropped, per reason, next to kept faces.
    by_reason: dict[str, list[bytes]] = {}
    for t in rejects:
        for reason, image in zip(t.column("reason").to_pylist(), t.column("image").to_pylist()):
            lst = by_reason.setdefault(reason, [])
            if len(lst) < SHEET_MAX:
                lst.append(image)
    sheets = []
    for reason, images in sorted(by_reason.items()):
        png = contact_sheet(images)
        if png:
            name = f"rejected_{reason}.png"
            storage.write_bytes(storage.join(report, name), png)
            sheets.append(f"<h3>{html.escape(reason)}</h3><img src=\"{name}\" alt=\"{html.escape(reason)}\">")
    if kept and kept[0].num_rows:
        png = contact_sheet(kept[0].column("image").to_pylist()[:SHEET_MAX])
        storage.write_bytes(storage.join(report, "kept_sample.png"), png)
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
    uri = storage.join(report, "index.html")
    storage.write_bytes(uri, page.encode())
    return uri
