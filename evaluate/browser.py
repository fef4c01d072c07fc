"""`archsae browse`: a static site to look at what each concept means; open index.html from
disk, no server, no CDN.

- index.html: every concept with its firing frequency, mean activation, stability match score
  against another fit (`--against`), its nearest archetype centroids (A-/RA-SAE); sortable and
  filterable; dead concepts listed apart.
- concepts/cNNNNN.html: the top-N images, the concept's activation over the patch grid drawn as
  a heatmap on each, activation values, links to the most similar atoms.
- images/iNNNNNN.html: one image with its strongest concepts and their heatmaps.
Images are shown as the backbone saw them (`archsae.extract.display`: its resize and centre
crop), so the patch grid lies on them exactly. Heatmaps are tiny inline PNGs (one pixel per patch): no files beyond one thumbnail per image.
"""

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from archsae.cache import TOKEN_KINDS
from archsae.errors import UserError
from archsae.evaluate.stability import match_atoms
from archsae.evaluate.top_activations import TopActivations, top_activations
from archsae.files import replaced_atomically
from archsae.fit import fit_settings, load, open_fit_store, unit_rows

NEIGHBOURS = 5
CENTROIDS_SHOWN = 3

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
a { color: #0b5cad; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f3f3f3; user-select: none; } th[data-dir=asc]::after { content: " ▲"; } th[data-dir=desc]::after { content: " ▼"; }
td.l, th.l { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 224px; } figcaption { font-size: 12px; }
.frame { position: relative; width: 224px; height: 224px; }
.frame img { width: 224px; height: 224px; display: block; }
.frame img.heat { position: absolute; inset: 0; image-rendering: pixelated; }
.thumb { width: 48px; height: 48px; vertical-align: middle; }
"""

JS = """
function sortTable(th) {
  const table = th.closest('table'), body = table.tBodies[0];
  const col = [...th.parentNode.children].indexOf(th);
  const dir = th.dataset.dir === 'desc' ? 'asc' : 'desc';
  table.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = dir;
  const rows = [...body.rows];
  rows.sort((a, b) => {
    const x = parseFloat(a.cells[col].dataset.v), y = parseFloat(b.cells[col].dataset.v);
    return dir === 'asc' ? x - y : y - x;
  });
  rows.forEach(r => body.appendChild(r));
}
function filterTable() {
  const text = document.getElementById('filter').value.trim().toLowerCase();
  const minFreq = parseFloat(document.getElementById('minfreq').value || '0');
  for (const row of document.querySelectorAll('#concepts tbody tr')) {
    const okText = !text || row.textContent.toLowerCase().includes(text);
    const okFreq = parseFloat(row.cells[1].dataset.v) >= minFreq;
    row.style.display = okText && okFreq ? '' : 'none';
  }
}
document.querySelectorAll('th[data-sortable]').forEach(th => th.addEventListener('click', () => sortTable(th)));
const f = document.getElementById('filter'); if (f) f.addEventListener('input', filterTable);
const m = document.getElementById('minfreq'); if (m) m.addEventListener('input', filterTable);
"""


def _page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='stylesheet' href='{up}site.css'></head><body>{body}"
            f"<script src='{up}site.js'></script></body></html>")


def _figures_page(title: str, heading: str, intro: str, section: str, figures: list[str]) -> str:
    """A page one folder down: back link, heading, intro, then a grid of figures."""
    body = (f"<p><a href='../index.html'>all concepts</a></p><h1>{heading}</h1>{intro}"
            f"<h2>{section}</h2><div class='grid'>{''.join(figures)}</div>")
    return _page(title, body, 1)


def concept_name(c: int) -> str:
    return f"c{c:05d}"


def image_name(i: int) -> str:
    return f"i{i:06d}"


def nearest_atoms(atoms: torch.Tensor, n: int = NEIGHBOURS, block: int = 1024):
    """(k, n) indices and cosines of each atom's most similar other atoms, in blocks of rows."""
    u = unit_rows(atoms.detach().double()).float()
    idx, cos = [], []
    for s in range(0, len(u), block):
        sims = u[s:s + block] @ u.T
        sims[torch.arange(len(sims)), torch.arange(s, s + len(sims))] = -2.0
        v, i = sims.topk(min(n, len(u) - 1), dim=1)
        idx.append(i)
        cos.append(v)
    return torch.cat(idx).numpy(), torch.cat(cos).numpy()


def _heat(values: np.ndarray, kinds: np.ndarray, grid, scale: float) -> str:
    """The activation over the patch grid as a tiny PNG (one pixel per patch, red, alpha =
    activation / scale) laid over the picture and stretched without smoothing."""
    patch = values[kinds == TOKEN_KINDS.index("patch")]
    if grid is None or len(patch) != grid[0] * grid[1] or scale <= 0:
        return ""
    rgba = np.zeros((grid[0], grid[1], 4), np.uint8)
    rgba[..., 0], rgba[..., 1] = 255, 40
    rgba[..., 3] = (np.clip(patch / scale, 0.0, 1.0) * 0.75 * 255).round().reshape(grid)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return f"<img class='heat' alt='' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _prefix_values(values: np.ndarray, kinds: np.ndarray) -> str:
    parts = [f"{TOKEN_KINDS[k]} {v:.3f}" for v, k in zip(values, kinds) if TOKEN_KINDS[k] != "patch"]
    return (" · " + ", ".join(parts)) if parts else ""


SITE_MARKER = "site.json"  # written into every site: only a folder holding it is replaced


@dataclass
class _Site:
    """What every page of one site draws on."""

    fitdir: str
    tops: TopActivations
    keys: np.ndarray
    kinds: np.ndarray
    grid: list | None
    neighbours: tuple[np.ndarray, np.ndarray]
    match: np.ndarray | None = None
    against: str | None = None
    centroids: list[str] | None = None

    def figure(self, i: int, c: int, link_to: str) -> str:
        """Image i with concept c's heatmap, on a page one folder down."""
        v = self.tops.heatmaps[(i, c)]
        scale = float(self.tops.values[c, 0]) if self.tops.values[c, 0] > 0 else float(v.max())
        target = (f"../images/{image_name(i)}.html" if link_to == "image"
                  else f"../concepts/{concept_name(c)}.html")
        key = html.escape(str(self.keys[i]))
        label = f"image {key}" if link_to == "image" else f"concept {c}"
        return (f"<figure><a href='{target}'><div class='frame'><img src='../img/"
                f"{image_name(i)}.jpg' alt='{key}'>{_heat(v, self.kinds, self.grid, scale)}</div></a>"
                f"<figcaption>{label}: max {v.max():.3f}{_prefix_values(v, self.kinds)}</figcaption></figure>")

    def concept_page(self, c: int) -> str:
        tops = self.tops
        imgs = [int(i) for i in tops.images[c] if i >= 0]
        near = " ".join(f"<a href='{concept_name(int(n))}.html'>{int(n)}</a> ({s:.2f})"
                        for n, s in zip(*(a[c] for a in self.neighbours)))
        facts = [f"firing frequency {tops.frequency[c]:.5f}", f"mean activation {tops.mean_activation[c]:.4f}"]
        if self.match is not None:
            facts.append(f"match against {html.escape(str(self.against))}: {self.match[c]:.3f}")
        if self.centroids is not None:
            facts.append(f"nearest centroids {self.centroids[c]}")
        return _figures_page(f"concept {c}", f"Concept {c}", f"<p>{' · '.join(facts)}</p><p>most "
                             f"similar atoms (cosine): {near}</p>", f"Top {len(imgs)} images",
                             [self.figure(i, c, "image") for i in imgs])

    def image_page(self, i: int) -> str:
        strongest = [c for c, _ in self.tops.image_concepts.get(i, []) if (i, c) in self.tops.heatmaps]
        return _figures_page(f"image {self.keys[i]}", f"Image {html.escape(str(self.keys[i]))}",
                             f"<p><img src='../img/{image_name(i)}.jpg' width='224' height='224'></p>",
                             "Strongest concepts", [self.figure(i, c, "concept") for c in strongest])

    def index_row(self, c: int) -> str:
        tops = self.tops
        cells = [f"<td class='l' data-v='{c}'><a href='concepts/{concept_name(c)}.html'>{c}</a></td>",
                 f"<td data-v='{tops.frequency[c]:.8g}'>{tops.frequency[c]:.5f}</td>",
                 f"<td data-v='{tops.mean_activation[c]:.8g}'>{tops.mean_activation[c]:.4f}</td>"]
        if self.match is not None:
            cells.append(f"<td data-v='{self.match[c]:.8g}'>{self.match[c]:.3f}</td>")
        if self.centroids is not None:
            cells.append(f"<td class='l'>{self.centroids[c]}</td>")
        cells.append(f"<td class='l'><img class='thumb' src='img/{image_name(int(tops.images[c, 0]))}.jpg' alt=''></td>")
        return "<tr>" + "".join(cells) + "</tr>"

    def index_page(self, title: str, live: list[int], dead: list[int]) -> str:
        headers = ["concept", "frequency", "mean activation"] + (["match"] if self.match is not None else [])
        header_html = "".join(f"<th data-sortable class='{'l' if h == 'concept' else ''}'>{h}</th>"
                              for h in headers)
        header_html += "<th class='l'>nearest centroids</th>" if self.centroids is not None else ""
        header_html += "<th class='l'>top image</th>"
        body = (f"<h1>Concepts of {html.escape(str(self.fitdir))}</h1><p>{title} · {len(live)} live, "
                f"{len(dead)} dead</p><p>Filter <input id='filter' placeholder='concept id or centroid'> "
                "minimum frequency <input id='minfreq' type='number' step='0.001' value='0'> · "
                "click a column to sort</p>"
                f"<table id='concepts'><thead><tr>{header_html}</tr></thead><tbody>"
                f"{''.join(self.index_row(c) for c in live)}</tbody></table>"
                f"<h2 id='dead'>Dead concepts ({len(dead)})</h2><p>Never fire on these images: "
                f"{', '.join(str(c) for c in dead) or 'none'}</p>")
        return _page("archsae concepts", body)


def _heaviest_centroids(w: torch.Tensor) -> list[str]:
    """The heaviest entries of each row of an archetypal W, as text."""
    cw, ci = w.detach().topk(min(CENTROIDS_SHOWN, w.shape[1]), dim=1)
    return [", ".join(f"{int(p)} ({wt:.2f})" for p, wt in zip(ps, ws) if wt >= 0.005)
            for ps, ws in zip(ci.tolist(), cw.tolist())]


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SITE_MARKER).is_file())):
        raise UserError(f"{out} exists and is not a site made by `archsae browse`: choose another "
                        "output folder (only an empty folder or an earlier site is replaced)")


def build_site(fitdir, out, thumbnail: Callable[[int], bytes], top: int = 16, against=None,
               part: str = "all", progress: bool = True) -> dict:
    """Write the site into `out` (whole or not at all); returns a summary. `thumbnail(i)` gives
    store image i as the backbone saw it, as JPEG bytes (224 x 224)."""
    out = Path(out)
    _check_replaceable(out)
    store, config = open_fit_store(fitdir)
    sae, _ = fit_settings(config)
    model = load(fitdir)
    atoms = model.dictionary.weight().detach()
    k = len(atoms)
    tops = top_activations(fitdir, top=top, part=part, progress=progress)
    site = _Site(str(fitdir), tops, np.asarray(store.group["keys"][:]), store.token_kind,
                 store.attrs.get("patch_grid"), nearest_atoms(atoms), against=against)
    if against is not None:
        other = load(against).dictionary.weight().detach()
        if len(other) < k:
            raise UserError(f"the fit {against} to match against has {len(other)} atoms, fewer than "
                            f"this fit's {k}: compare against a fit at least as large")
        site.match = np.abs(match_atoms(atoms, other)[1])
    if sae.dictionary == "archetypal":
        site.centroids = _heaviest_centroids(model.dictionary.dense_W())
    live = [c for c in range(k) if tops.frequency[c] > 0]
    dead = [c for c in range(k) if tops.frequency[c] == 0]
    shown = tops.site_images()
    title = (f"{sae.name} · {k} concepts · store {html.escape(str(store.path))} "
             f"({html.escape(str(store.attrs.get('model')))}, weights "
             f"{html.escape(str(store.attrs.get('weights')))}) · {tops.tokens_seen} tokens of the {part} images")
    summary = {"site": "archsae browse", "fit": str(fitdir), "concepts": k, "live": len(live),
               "dead": len(dead), "images": len(shown), "top": top, "part": part,
               "against": str(against) if against else None}
    with replaced_atomically(out, folder=True) as tmp:
        for sub in ("concepts", "images", "img"):
            (tmp / sub).mkdir()
        (tmp / "site.css").write_text(CSS)
        (tmp / "site.js").write_text(JS)
        for i in tqdm(shown, unit="img", desc="thumbnails", disable=not progress):
            (tmp / "img" / f"{image_name(i)}.jpg").write_bytes(thumbnail(i))
        for c in tqdm(live, unit="concept", desc="concept pages", disable=not progress):
            (tmp / "concepts" / f"{concept_name(c)}.html").write_text(site.concept_page(c))
        for i in tqdm(shown, unit="img", desc="image pages", disable=not progress):
            (tmp / "images" / f"{image_name(i)}.html").write_text(site.image_page(i))
        (tmp / "index.html").write_text(site.index_page(title, live, dead))
        (tmp / SITE_MARKER).write_text(json.dumps(summary, indent=1))
    summary["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return summary
