"""One line per committed seed sweep and noise band: how many cases meet issue 29's bar and the
worst of each figure with the case that gives it (benchmarks/results/refinement.md's summary).

Usage:
    .venv/bin/python benchmarks/summarize_refinement_sweeps.py benchmarks/results/refinement_seed_sweep_face_prior.json ...

Reads only the results JSON of benchmarks/sweep_refinement_seeds.py (its `cases`); a case
meets the bar as a level does there (`meets_bar`): precision and recall >= 0.95, no false
merge, no missed merge, no evaluation-overlap identity kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.sweep_refinement_seeds import meets_bar, tabulate  # noqa: E402

BAR_UP_TO = 0.45  # issue 29 holds levels up to 45% to the bar and reports 50%


def _start(results: dict) -> str:
    overrides = " ".join(results.get("overrides", []))
    return "face model" if "train.init_backbone=" in overrides else "random weights"


def _case(c: dict) -> str:
    kind = "look-alike" if c["kind"] == "confusable" else c["kind"]
    return f"{c['label_noise']:g} {kind} s{c['seed']}"


def _worst(cases: list[dict], figure: str) -> str:
    worst = round(min(c["summary"][figure] for c in cases), 4)  # ties as the tables print them
    at = [_case(c) for c in cases if round(c["summary"][figure], 4) == worst]
    where = "every case" if len(at) == len(cases) else at[0] + (f" +{len(at) - 1} more" if len(at) > 1 else "")
    return f"{worst:.4f} ({where})"


def _count(cases: list[dict], figure: str) -> str:
    """The total over cases, and in how many cases (a list, e.g. overlap_kept, counts its length)."""
    per_case = [v if isinstance(v, int) else len(v) for v in (c["summary"][figure] for c in cases)]
    hit = sum(1 for n in per_case if n)
    return f"{sum(per_case)} in {hit} case{'s' if hit > 1 else ''}" if hit else "0"


def summary_rows(path: Path) -> list[str]:
    results = json.loads(path.read_text())
    # only the cases the sweep planned: a --work folder shared by two sweeps holds both's cases
    grid = {tuple(p) for p in results.get("planned", [])}
    rows = []
    for band, keep in ((f"0.3-{BAR_UP_TO:g}", lambda level: level <= BAR_UP_TO),
                       ("0.5", lambda level: level > BAR_UP_TO)):
        planned = [c for c in results["cases"] if keep(c["label_noise"]) and (not grid or (
            c["identities"], c["images_per_identity"], c["label_noise"], c["kind"], c["seed"]) in grid)]
        chosen = [c for c in planned if "summary" in c]  # a case that failed to run counts as short of the bar
        if not chosen:
            continue
        met = sum(meets_bar(tabulate([c])[0]) for c in chosen)
        sizes = sorted({f"{c['identities']} x {c['images_per_identity']}" for c in chosen})
        rows.append(f"| {_start(results)} | {', '.join(sizes)} | {band} | {met} / {len(planned)} "
                    f"| {_worst(chosen, 'precision')} | {_worst(chosen, 'recall')} "
                    f"| {_count(chosen, 'false_merges')} | {_count(chosen, 'missed_merges')} "
                    f"| {_count(chosen, 'overlap_kept')} | `{path.stem}` ({', '.join(c[:7] for c in results['code'])}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="results JSON of sweep_refinement_seeds.py")
    args = ap.parse_args()
    print("| start | size | noise | cases meeting the bar | worst precision (case) | worst recall (case) "
          "| false merges | missed merges | overlap identities kept | table (code) |")
    print("|---|---|---|---:|---|---|---|---|---|---|")
    for path in args.results:
        print("\n".join(summary_rows(path)))


if __name__ == "__main__":
    main()
