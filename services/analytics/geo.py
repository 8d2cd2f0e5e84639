"""Build the dashboard's map file: the 38 municipality boundaries simplified for the browser.

Source: `shared/reference/kosovo_municipalities.geojson` (geoBoundaries gbOpen XKX ADM2,
CC BY-SA 2.0, data (c) OpenStreetMap contributors; see shared/reference/SOURCES.md), copied into
this project from ../shared/reference. Output: `services/analytics/static/kosovo_municipalities.geojson`
with each ring simplified by Douglas-Peucker (tolerance in degrees), coordinates rounded, and a
`slug` property added (joined on `code`). Regenerate with `python -m services.analytics.geo`.

Pure functions; the CLI at the bottom reads and writes the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Point = tuple[float, float]

ATTRIBUTION = ("Boundaries: geoBoundaries (Runfola et al.), CC BY-SA 2.0; "
               "data \u00a9 OpenStreetMap contributors.")


def _perp_distance(p: Point, a: Point, b: Point) -> float:
    (x, y), (x1, y1), (x2, y2) = p, a, b
    dx, dy = x2 - x1, y2 - y1
    if dx == 0 and dy == 0:
        return ((x - x1) ** 2 + (y - y1) ** 2) ** 0.5
    t = max(0.0, min(1.0, ((x - x1) * dx + (y - y1) * dy) / (dx * dx + dy * dy)))
    px, py = x1 + t * dx, y1 + t * dy
    return ((x - px) ** 2 + (y - py) ** 2) ** 0.5


def douglas_peucker(points: list[Point], tolerance: float) -> list[Point]:
    if len(points) < 3:
        return list(points)
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        i, j = stack.pop()
        best, idx = 0.0, -1
        for k in range(i + 1, j):
            d = _perp_distance(points[k], points[i], points[j])
            if d > best:
                best, idx = d, k
        if idx >= 0 and best > tolerance:
            keep[idx] = True
            stack += [(i, idx), (idx, j)]
    return [p for p, k in zip(points, keep) if k]


def simplify_ring(ring: list[list[float]], tolerance: float, digits: int = 4) -> list[list[float]] | None:
    pts = [(float(x), float(y)) for x, y, *_ in ring]
    out = douglas_peucker(pts, tolerance)
    rounded: list[list[float]] = []
    for x, y in out:
        p = [round(x, digits), round(y, digits)]
        if not rounded or rounded[-1] != p:
            rounded.append(p)
    if rounded[0] != rounded[-1]:
        rounded.append(rounded[0])
    return rounded if len(rounded) >= 4 else None


def simplify(geojson: dict[str, Any], *, code_to_slug: dict[str, str], tolerance: float = 0.0012) -> dict[str, Any]:
    features = []
    for f in geojson["features"]:
        geom = f["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        new_polys = []
        for poly in polys:
            rings = [simplify_ring(r, tolerance) for r in poly]
            if rings and rings[0] is not None:
                new_polys.append([r for r in rings if r is not None])
        code = f["properties"]["code"]
        features.append({
            "type": "Feature",
            "properties": {"code": code, "slug": code_to_slug[code], "shapeName": f["properties"].get("shapeName")},
            "geometry": {"type": "MultiPolygon", "coordinates": new_polys},
        })
    return {"type": "FeatureCollection", "attribution": ATTRIBUTION, "features": features}


def main(argv: list[str]) -> None:
    from shared.reference import REFERENCE_DIR, municipalities

    src = Path(argv[0]) if argv else REFERENCE_DIR / "kosovo_municipalities.geojson"
    dst = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "static" / "kosovo_municipalities.geojson"
    code_to_slug = {m.code: m.slug for m in municipalities().values()}
    out = simplify(json.loads(src.read_text()), code_to_slug=code_to_slug)
    dst.write_text(json.dumps(out, separators=(",", ":")))
    print(f"{dst}: {dst.stat().st_size} bytes, {len(out['features'])} features")


if __name__ == "__main__":
    main(sys.argv[1:])
