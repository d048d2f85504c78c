"""Write an :class:`~pvt_d2.evaluation.report.Analysis` as a folder: ``index.html`` plus its pictures.

The page is self-contained: inline CSS and a few lines of inline JavaScript
(sortable tables), pictures as relative paths under ``img/``, no network, so
it opens from disk (``file://``) in any browser.
"""
import html
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .report import AREAS, ERROR_NAMES, ERROR_TYPES, Analysis, ImageResult

__all__ = ["write_report", "write_comparison", "draw_image_panels", "MARKER"]

MARKER = ".pvt_d2_report"  # written into every report folder: the tool may replace a folder holding it
_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_TYPE_NAMES = {"bbox": "box", "segm": "mask"}
# BGR colours of the drawings (and the same in the page's legend)
COLORS = {"tp": (40, 170, 40), "fp": (40, 40, 230), "cls": (200, 40, 200), "fn": (0, 150, 255),
          "ign": (150, 150, 150)}
_ERROR_COLORS = ("#ffffff", "#ffffff", "#4f82bd", "#bf4f4c", "#5be661", "#8063a3", "#ff9900")

_CSS = """
body{font-family:system-ui,'Segoe UI',Roboto,Arial,sans-serif;margin:0 2em 3em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ccc;padding-top:.6em} h3{margin-bottom:.3em}
nav a{margin-right:1em} .meta{color:#555}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right} th{background:#f1f1f1}
td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer} table.sortable th:after{content:' \\2195';color:#aaa}
.neg{color:#b00} .pos{color:#070}
.grid{display:flex;flex-wrap:wrap;gap:10px} .grid figure{margin:0}
figcaption{font-size:13px;color:#444;max-width:700px}
img{max-width:100%} .legend span{display:inline-block;padding:1px 8px;margin-right:6px;color:#fff;border-radius:3px}
details{margin:.5em 0} .wide{overflow-x:auto} summary{cursor:pointer;font-weight:600}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var r = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return asc ? r : -r;
      });
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(text) -> str:
    return html.escape(str(text))


def _pct(v: float) -> str:
    return "–" if v is None or v < 0 else f"{100 * v:.1f}"


def _cell(value, text: Optional[str] = None, cls: str = "") -> str:
    """A ``<td>`` carrying its sort value."""
    if isinstance(value, float) and value < 0:
        value = -1e9
    shown = text if text is not None else value
    c = f' class="{cls}"' if cls else ""
    return f'<td data-v="{_e(value)}"{c}>{_e(shown)}</td>'


def _delta(a: float, b: float) -> str:
    if a < 0 or b < 0:
        return _cell(-1e9, "–")
    d = round(100 * (b - a), 1) + 0.0  # + 0.0: no "-0.0"
    return _cell(d, f"{d:+.1f}", "pos" if d > 0 else ("neg" if d < 0 else ""))


def _table(headers: Sequence[str], rows: List[str], sortable: bool = True) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cls = ' class="sortable"' if sortable else ""
    return (f'<div class="wide"><table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f"</div>")


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}'
            f'<script>{_JS}</script></body></html>\n')


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_pr(path: str, recall: np.ndarray, curves: Dict[str, np.ndarray], title: str, small: bool = False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.2, 2.6) if small else (5, 4), dpi=90)
    for label, p in curves.items():
        ax.plot(recall, np.clip(p, 0, None), label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=.3)
    ax.legend(loc="lower left", fontsize=7 if small else 9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_breakdown(path: str, recall: np.ndarray, curves: np.ndarray, aps: Dict[str, float], title: str,
                    small: bool = False):
    """Stacked areas as in the COCO analysis: each error type fills up to its precision curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.8) if small else (6, 4.2), dpi=90)
    below = np.zeros_like(recall, dtype=float)
    for i, t in enumerate(ERROR_TYPES):
        ax.plot(recall, curves[i], color="black", linewidth=0.5)
        ax.fill_between(recall, below, curves[i], color=_ERROR_COLORS[i] if i > 1 else ("#ffffff"),
                        label=f"[{aps[t]:.3f}] {t}", edgecolor="none")
        below = curves[i]
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=title)
    ax.legend(loc="lower left", fontsize=6 if small else 8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_confusion(path: str, cm: np.ndarray, labels: Sequence[str], title: str):
    plt = _plt()
    n = len(labels)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=90)
    rows = cm.sum(axis=1, keepdims=True).astype(float)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the row")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="black" if norm[i, j] > 0.6 else "white")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- drawing
def _read_image(path: str, height: int, width: int) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR) if path and os.path.isfile(path) else None
    if img is None:  # the picture is gone: draw on grey so the boxes still show
        img = np.full((max(int(height), 1), max(int(width), 1), 3), 200, np.uint8)
    return img


def _draw_box(img, box, color, text: str, scale: float):
    x, y, w, h = (float(v) * scale for v in box)
    p0, p1 = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
    cv2.rectangle(img, p0, p1, color, 2)
    if text:
        fs = 0.45
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
        ty = p0[1] - 3 if p0[1] - th - base - 3 > 0 else p1[1] + th + 3
        ty = min(ty, img.shape[0] - 2)
        cv2.rectangle(img, (p0[0], ty - th - 2), (p0[0] + tw + 2, ty + base - 1), color, -1)
        cv2.putText(img, text, (p0[0] + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)


def _title(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((22, img.shape[1], 3), 40, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def draw_image_panels(image_path: str, meta: Dict, panels: List[Tuple[str, ImageResult, str]],
                      names: Dict[int, str], min_side: int = 320) -> np.ndarray:
    """Side-by-side drawings of one image: for each ``(title, result, what)``, ``what`` = ``"pred"`` draws
    the detections, ``"gt"`` the ground truth, each coloured by its state (see :data:`COLORS`)."""
    base = _read_image(image_path, meta.get("height", 100), meta.get("width", 100))
    scale = max(1.0, min_side / max(1, min(base.shape[:2])))
    if scale > 1:
        base = cv2.resize(base, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    out = []
    for title, result, what in panels:
        img = base.copy()
        if what == "pred":
            for _did, cat, score, box, state, other in sorted(result.dets, key=lambda d: d[2]):
                text = f"{names.get(cat, cat)} {score:.2f}" + (f" (is {names.get(other, other)})" if other else "")
                _draw_box(img, box, COLORS[state], text, scale)
        else:
            for _gid, cat, box, state, other in result.gts:
                text = names.get(cat, str(cat)) + (f" (as {names.get(other, other)})" if other else "")
                _draw_box(img, box, COLORS[state], text, scale)
        out.append(_title(img, title))
        out.append(np.full((img.shape[0] + 22, 4, 3), 255, np.uint8))
    return np.concatenate(out[:-1], axis=1)


# -------------------------------------------------------------------------------------------- sections
def _legend(compare: bool = False) -> str:
    def span(state, text):
        b, g, r = COLORS[state]
        return f'<span style="background:rgb({r},{g},{b})">{_e(text)}</span>'

    if compare:
        return ('<p class="legend">detections: ' + span("tp", "matched") + span("fp", "false")
                + span("cls", "class confusion") + "; ground truth: " + span("tp", "found by both")
                + span("cls", "found by A only") + span("fn", "found by B only") + span("fp", "missed by both")
                + span("ign", "crowd / ignored") + "</p>")
    return ('<p class="legend">' + span("tp", "matched") + span("fp", "false detection")
            + span("cls", "class confusion (detection or object)") + span("fn", "missed object")
            + span("ign", "crowd / ignored") + "</p>")


def _summary_section(a: Analysis) -> str:
    rows = []
    for t in a.iou_types:
        rows.append(f"<tr><td>{_TYPE_NAMES.get(t, t)}</td>"
                    + "".join(_cell(a.summary[t][k], _pct(a.summary[t][k])) for k in _SUMMARY_KEYS) + "</tr>")
    return ('<h2 id="summary">COCO summary</h2>'
            + _table(["", *_SUMMARY_KEYS], rows, sortable=False)
            + '<p class="meta">COCOeval as detectron2 runs it: AP over IoU 0.50:0.95, s/m/l = objects under '
              '32², 32²-96², over 96² pixels; AR1/10/100 = recall with at most 1/10/100 detections per image.</p>')


def _per_class_section(a: Analysis) -> str:
    headers = ["class", "objects", "detections"]
    for t in a.iou_types:
        n = _TYPE_NAMES.get(t, t)
        headers += [f"{n} AP", f"{n} AP50", f"{n} AP75", f"{n} APs", f"{n} APm", f"{n} APl", f"{n} AR100",
                    f"{n} recall@0.5"]
    headers += [f"TP@{a.score_thr:g}", "FP", "FN"]
    rows = []
    for k, name in enumerate(a.classes):
        first = a.per_class[a.iou_types[0]][k]
        cells = [_cell(name), _cell(first["GT"]), _cell(first["dets"])]
        for t in a.iou_types:
            r = a.per_class[t][k]
            cells += [_cell(r[m], _pct(r[m])) for m in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "R50")]
        cells += [_cell(first["TP"]), _cell(first["FP"]), _cell(first["FN"])]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<h2 id="classes">Per class</h2><p class="meta">Click a column to sort. TP / FP / FN: box matches at '
            f'IoU {a.iou_thr:g} of the detections scoring at least {a.score_thr:g} (FP includes class '
            'confusions).</p>' + _table(headers, rows))


def _pr_section(a: Analysis, out: str, prefix: str) -> str:
    parts = ['<h2 id="pr">Precision-recall curves</h2><p class="meta">Area all, up to 100 detections per image; '
             'the overall curve is the mean over the classes with ground truth.</p><div class="grid">']
    for t in a.iou_types:
        curves = {}
        for iou, p in a.pr[t].items():
            valid = (p > -1).any(axis=1)
            curves[f"IoU {iou}"] = np.clip(p[valid], 0, None).mean(axis=0) if valid.any() else np.zeros(p.shape[1])
        name = f"{prefix}pr_{t}_all.png"
        _plot_pr(os.path.join(out, name), a.recall_thrs, curves, f"{_TYPE_NAMES.get(t, t)}: all classes")
        parts.append(f'<figure><img src="{name}" alt="PR {t} all classes"></figure>')
    parts.append("</div><details><summary>per class</summary><div class=\"grid\">")
    for k, cls in enumerate(a.classes):
        for t in a.iou_types:
            curves = {f"IoU {iou}": p[k] for iou, p in a.pr[t].items()}
            name = f"{prefix}pr_{t}_{k}.png"
            _plot_pr(os.path.join(out, name), a.recall_thrs, curves, f"{cls} ({_TYPE_NAMES.get(t, t)})", small=True)
            parts.append(f'<figure><img src="{name}" alt="PR {_e(cls)} {t}"></figure>')
    parts.append("</div></details>")
    return "".join(parts)


def _breakdown_section(a: Analysis, out: str, prefix: str) -> str:
    legend = "".join(f"<li><b>{t}</b>: {_e(ERROR_NAMES[t])}</li>" for t in ERROR_TYPES)
    parts = ['<h2 id="errors">Error breakdown</h2><p class="meta">The COCO analysis (Hoiem et al.) as '
             "mmdetection's coco_error_analysis.py plots it. Each number is the AP once the errors of that "
             "kind and of the kinds above it are forgiven; the gap between two neighbours is what that kind "
             f"of error costs.</p><ul>{legend}</ul>"]
    for t in a.iou_types:
        n = _TYPE_NAMES.get(t, t)
        rows = []
        for area in AREAS:
            vals = a.breakdown_table(t, area)
            rows.append(f"<tr><td>{area}</td>" + "".join(_cell(vals[e], _pct(vals[e])) for e in ERROR_TYPES)
                        + "</tr>")
        parts.append(f"<h3>{n}: all classes</h3>" + _table(["area", *ERROR_TYPES], rows, sortable=False))
        name = f"{prefix}errors_{t}_all.png"
        ps, valid = a.breakdown[t], a.breakdown_valid[t]
        keep = valid[:, 0]
        curves = ps[:, :, keep, 0].mean(axis=2) if keep.any() else ps[:, :, 0, 0] * 0
        _plot_breakdown(os.path.join(out, name), a.recall_thrs, curves, a.breakdown_table(t), f"{n}: all classes")
        parts.append(f'<figure><img src="{name}" alt="error breakdown {t}"></figure>')
        rows = []
        for k, cls in enumerate(a.classes):
            vals = a.breakdown_table(t, "all", k)
            rows.append(f"<tr>{_cell(cls)}" + "".join(_cell(vals[e], _pct(vals[e])) for e in ERROR_TYPES)
                        + "".join(_cell(vals[x] - vals[y], _pct(vals[x] - vals[y]) if vals[y] >= 0 else "–")
                                  for x, y in (("Loc", "C50"), ("Oth", "Loc"), ("BG", "Oth"), ("FN", "BG")))
                        + "</tr>")
        parts.append(f"<h3>{n}: per class (area all)</h3>"
                     + _table(["class", *ERROR_TYPES, "cost: localisation", "cost: confusion",
                               "cost: background", "cost: missed"], rows))
        parts.append(f'<details><summary>{n}: plot per class</summary><div class="grid">')
        for k, cls in enumerate(a.classes):
            if not valid[k, 0]:
                continue
            name = f"{prefix}errors_{t}_{k}.png"
            _plot_breakdown(os.path.join(out, name), a.recall_thrs, ps[:, :, k, 0], a.breakdown_table(t, "all", k),
                            f"{cls} ({n})", small=True)
            parts.append(f'<figure><img src="{name}" alt="errors {_e(cls)} {t}"></figure>')
        parts.append("</div></details>")
    return "".join(parts)


def _confusion_table(cm: np.ndarray, labels: Sequence[str], diff: bool = False) -> str:
    """The matrix as a table; ``diff``: a difference B - A, green where B is better (more on the diagonal,
    fewer elsewhere), red where it is worse."""
    n = len(labels)
    rows = []
    scale = max(1, int(np.abs(cm).max())) if diff else 1
    for i, lab in enumerate(labels):
        cells = []
        for j in range(n):
            v = int(cm[i, j])
            if diff:
                better = (v > 0) == (i == j and i < n - 1)
                color, alpha = ("40,140,40" if better else "200,40,40"), abs(v) / scale
            else:
                total = max(1, int(cm[i].sum()) if i < n - 1 else int(cm[:, j].sum()))
                color, alpha = ("40,140,40" if i == j else "200,40,40"), v / total
            cells.append(f'<td data-v="{v}" style="background:rgba({color},{alpha:.2f})">{v:+d}</td>' if diff else
                         f'<td data-v="{v}" style="background:rgba({color},{alpha:.2f})">{v}</td>')
        total_cell = "" if diff else (f"<td>{int(cm[i].sum())}</td>" if i < n - 1 else "<td></td>")
        rows.append(f"<tr><th>{_e(lab)}</th>{''.join(cells)}{total_cell}</tr>")
    head = "".join(f"<th>{_e(lab)}</th>" for lab in labels)
    if diff:
        return (f'<div class="wide"><table><thead><tr><th>ground truth \\ prediction</th>{head}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table></div>")
    totals = "".join(f"<td>{int(cm[:, j].sum())}</td>" for j in range(n - 1)) + "<td></td>"
    return (f'<div class="wide"><table><thead><tr><th>ground truth \\ prediction</th>{head}<th>objects</th></tr>'
            f"</thead><tbody>{''.join(rows)}<tr><th>detections</th>{totals}<td></td></tr></tbody></table></div>")


def _confusion_section(a: Analysis, out: str, prefix: str) -> str:
    labels = a.classes + ["background"]
    parts = [f'<h2 id="confusion">Confusion matrix</h2><p class="meta">Detections scoring at least {a.score_thr:g}; '
             f"a detection matching an object of its class at IoU {a.iou_thr:g} is on the diagonal. The remaining "
             "false detections and missed objects are matched once more, ignoring classes: such a pair is a "
             "confusion (row: the object's class, column: the detection's). A false detection left over is in "
             "the background row, a missed object left over in the background column. Each detection and each "
             "object is counted once (rows sum to the objects, columns to the detections).</p>"]
    for t in a.iou_types:
        n = _TYPE_NAMES.get(t, t)
        name = f"{prefix}confusion_{t}.png"
        _plot_confusion(os.path.join(out, name), a.confusion[t], labels, f"{n}: confusion matrix")
        parts.append(f"<h3>{n}</h3>" + _confusion_table(a.confusion[t], labels)
                     + f'<figure><img src="{name}" alt="confusion {t}"></figure>')
    return "".join(parts)


def _images_section(a: Analysis, out: str, prefix: str, image_root: str, num: int, names: Dict[int, str],
                    metas: Dict[int, Dict]) -> str:
    parts = [f'<h2 id="images">Images with the most errors</h2><p class="meta">Boxes at IoU {a.iou_thr:g} and '
             f"score ≥ {a.score_thr:g}; left: detections, right: ground truth.</p>" + _legend()]
    lists = (("most missed objects", lambda im: (im.missed, im.false)),
             ("most false detections", lambda im: (im.false, im.missed)))
    for title, key in lists:
        ranked = sorted((im for im in a.images if key(im)[0] > 0), key=lambda im: (-key(im)[0], -key(im)[1],
                                                                                   im.image_id))[:num]
        parts.append(f"<h3>{_e(title)}</h3>")
        if not ranked:
            parts.append("<p>none</p>")
            continue
        parts.append('<div class="grid">')
        for im in ranked:
            name = f"{prefix}img_{'missed' if 'missed' in title else 'false'}_{im.image_id}.jpg"
            path = os.path.join(out, name)
            if not os.path.exists(path):
                drawn = draw_image_panels(os.path.join(image_root, im.file_name), metas.get(im.image_id, {}),
                                          [("detections", im, "pred"), ("ground truth", im, "gt")], names)
                cv2.imwrite(path, drawn, [cv2.IMWRITE_JPEG_QUALITY, 90])
            parts.append(f'<figure><img src="{name}" alt="{_e(im.file_name)}"><figcaption>{_e(im.file_name)} '
                         f"(id {im.image_id}): {im.missed} missed, {im.false} false, "
                         f"{im.count('gts', 'tp')} found</figcaption></figure>")
        parts.append("</div>")
    return "".join(parts)


def _header(a: Analysis, title: str, inputs: Dict[str, str]) -> str:
    meta = "".join(f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in inputs.items())
    return (f"<h1>{_e(title)}</h1><ul class=\"meta\">{meta}<li>{a.num_images} images, {a.num_gt} objects, "
            f"{a.num_dets} detections, {len(a.classes)} classes</li></ul>"
            '<nav><a href="#summary">summary</a><a href="#classes">per class</a><a href="#pr">PR curves</a>'
            '<a href="#errors">error breakdown</a><a href="#confusion">confusion matrix</a>'
            '<a href="#images">images</a></nav>')


def write_report(a: Analysis, out: str, *, image_root: str, metas: Dict[int, Dict], inputs: Dict[str, str],
                 num_images: int = 8, title: str = "Detection report") -> str:
    """Write ``out/index.html``, ``out/report.json`` and the pictures under ``out/img/``; returns the html path."""
    img_dir = os.path.join(out, "img")
    os.makedirs(img_dir, exist_ok=True)
    names = dict(zip(a.cat_ids, a.classes))
    body = (_header(a, title, inputs) + _summary_section(a) + _per_class_section(a)
            + _pr_section(a, out, "img/") + _breakdown_section(a, out, "img/") + _confusion_section(a, out, "img/")
            + _images_section(a, out, "img/", image_root, num_images, names, metas))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(a.to_json(), f, indent=1)
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(title, body))
    return path


# ------------------------------------------------------------------------------------------ comparison
def disagreements(a: Analysis, b: Analysis) -> List[Tuple[int, ImageResult, ImageResult, int]]:
    """Per image: ``(score, result A, result B, image id)``, score = objects found by exactly one of the two
    plus the difference of their false detections; highest first, images where they agree left out."""
    by_b = {im.image_id: im for im in b.images}
    out = []
    for ia in a.images:
        ib = by_b[ia.image_id]
        score = len(ia.found_ids() ^ ib.found_ids()) + abs(ia.false - ib.false)
        if score:
            out.append((score, ia, ib, ia.image_id))
    out.sort(key=lambda x: (-x[0], x[3]))
    return out


def _gt_agreement(ia: ImageResult, ib: ImageResult) -> ImageResult:
    """The ground truth coloured by who found it: both (tp), A only (cls), B only (fn), neither (fp)."""
    fa, fb = ia.found_ids(), ib.found_ids()
    res = ImageResult(ia.image_id, ia.file_name)
    for gid, cat, box, state, _ in ia.gts:
        if state == "ign":
            s = "ign"
        else:
            s = {(True, True): "tp", (True, False): "cls", (False, True): "fn", (False, False): "fp"}[
                (gid in fa, gid in fb)]
        res.gts.append([gid, cat, box, s, None])
    return res


def write_comparison(a: Analysis, b: Analysis, out: str, *, names_ab: Tuple[str, str], image_root: str,
                     metas: Dict[int, Dict], inputs: Dict[str, str], num_images: int = 8) -> str:
    """Write the comparison page ``out/index.html`` (and each run's own report under ``out/a/``, ``out/b/``)."""
    na, nb = names_ab
    for sub, an, nm in (("a", a, na), ("b", b, nb)):
        write_report(an, os.path.join(out, sub), image_root=image_root, metas=metas,
                     inputs={"run": nm, **{k: v for k, v in inputs.items() if k.startswith(sub.upper() + " ")}},
                     num_images=num_images, title=f"Detection report: {nm}")
    img_dir = os.path.join(out, "img")
    os.makedirs(img_dir, exist_ok=True)
    types = [t for t in a.iou_types if t in b.iou_types]
    meta = "".join(f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in inputs.items())
    parts = [f"<h1>Comparison: {_e(na)} (A) vs {_e(nb)} (B)</h1><ul class=\"meta\">{meta}"
             f"<li>{a.num_images} images, {a.num_gt} objects; detections A {a.num_dets}, B {b.num_dets}</li></ul>"
             f'<p>Full reports: <a href="a/index.html">A: {_e(na)}</a> · <a href="b/index.html">B: {_e(nb)}</a></p>'
             '<nav><a href="#summary">summary</a><a href="#classes">per class</a><a href="#errors">error '
             'breakdown</a><a href="#confusion">confusion</a><a href="#images">images</a></nav>']
    rows = []
    for t in types:
        for tag, x in (("A", a), ("B", b)):
            rows.append(f"<tr><td>{_TYPE_NAMES.get(t, t)} {tag}</td>"
                        + "".join(_cell(x.summary[t][k], _pct(x.summary[t][k])) for k in _SUMMARY_KEYS) + "</tr>")
        rows.append(f"<tr><td>{_TYPE_NAMES.get(t, t)} B − A</td>"
                    + "".join(_delta(a.summary[t][k], b.summary[t][k]) for k in _SUMMARY_KEYS) + "</tr>")
    parts.append('<h2 id="summary">COCO summary</h2>' + _table(["", *_SUMMARY_KEYS], rows, sortable=False))
    headers = ["class", "objects"]
    for t in types:
        n = _TYPE_NAMES.get(t, t)
        headers += [f"{n} AP A", f"{n} AP B", f"{n} AP B−A", f"{n} AR100 A", f"{n} AR100 B", f"{n} AR B−A"]
    headers += ["FN A", "FN B", "FP A", "FP B"]
    rows = []
    for k, cls in enumerate(a.classes):
        cells = [_cell(cls), _cell(a.per_class[types[0]][k]["GT"])]
        for t in types:
            ra, rb = a.per_class[t][k], b.per_class[t][k]
            cells += [_cell(ra["AP"], _pct(ra["AP"])), _cell(rb["AP"], _pct(rb["AP"])), _delta(ra["AP"], rb["AP"]),
                      _cell(ra["AR"], _pct(ra["AR"])), _cell(rb["AR"], _pct(rb["AR"])), _delta(ra["AR"], rb["AR"])]
        ra, rb = a.per_class[types[0]][k], b.per_class[types[0]][k]
        cells += [_cell(ra["FN"]), _cell(rb["FN"]), _cell(ra["FP"]), _cell(rb["FP"])]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts.append('<h2 id="classes">Per class</h2><p class="meta">Click a column to sort (e.g. by the AP '
                 'difference).</p>' + _table(headers, rows))
    parts.append('<h2 id="errors">Error breakdown</h2><p class="meta">AP once the errors of each kind (and the '
                 'kinds before it) are forgiven; "cost" rows: what each kind of error costs (the gap to the '
                 'previous column).</p>')
    for t in types:
        n = _TYPE_NAMES.get(t, t)
        rows = []
        for area in AREAS:
            va, vb = a.breakdown_table(t, area), b.breakdown_table(t, area)
            rows.append(f"<tr><td>{area} A</td>" + "".join(_cell(va[e], _pct(va[e])) for e in ERROR_TYPES) + "</tr>")
            rows.append(f"<tr><td>{area} B</td>" + "".join(_cell(vb[e], _pct(vb[e])) for e in ERROR_TYPES) + "</tr>")
            rows.append(f"<tr><td>{area} B − A</td>" + "".join(_delta(va[e], vb[e]) for e in ERROR_TYPES) + "</tr>")
        parts.append(f"<h3>{n}: all classes</h3>" + _table(["area", *ERROR_TYPES], rows, sortable=False))
        rows = []
        for k, cls in enumerate(a.classes):
            va, vb = a.breakdown_table(t, "all", k), b.breakdown_table(t, "all", k)
            cells = [_cell(cls)]
            for x, y in (("C50", None), ("Loc", "C50"), ("Oth", "Loc"), ("BG", "Oth"), ("FN", "BG")):
                ca = va[x] - (va[y] if y else 0)
                cb = vb[x] - (vb[y] if y else 0)
                cells += [_cell(ca, _pct(ca)), _cell(cb, _pct(cb)), _delta(ca, cb)]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        hdr = ["class"]
        for lab in ("C50", "cost loc", "cost confusion", "cost background", "cost missed"):
            hdr += [f"{lab} A", f"{lab} B", f"{lab} B−A"]
        parts.append(f"<h3>{n}: per class (area all)</h3>" + _table(hdr, rows))
    labels = a.classes + ["background"]
    parts.append('<h2 id="confusion">Confusion matrices</h2><p class="meta">B − A per cell (green: B better, more '
                 'matches on the diagonal or fewer errors elsewhere; red: worse); the full matrices are in the two '
                 'reports.</p>')
    for t in types:
        diff = b.confusion[t] - a.confusion[t]
        parts.append(f"<h3>{_TYPE_NAMES.get(t, t)}: B − A</h3>" + _confusion_table(diff, labels, diff=True))
    names = dict(zip(a.cat_ids, a.classes))
    ranked = disagreements(a, b)[:num_images]
    parts.append('<h2 id="images">Images where they disagree most</h2><p class="meta">Ranked by the objects found '
                 'by only one of the two plus the difference in false detections. Ground truth colours: green '
                 f'found by both, purple by A only, orange by B only, red by neither.</p>{_legend(compare=True)}')
    if not ranked:
        parts.append("<p>none: both runs match the same objects and make as many false detections on every "
                     "image</p>")
    parts.append('<div class="grid">')
    for _score, ia, ib, img_id in ranked:
        name = f"img/disagree_{img_id}.jpg"
        drawn = draw_image_panels(os.path.join(image_root, ia.file_name), metas.get(img_id, {}),
                                  [(f"A: {na}", ia, "pred"), (f"B: {nb}", ib, "pred"),
                                   ("ground truth", _gt_agreement(ia, ib), "gt")], names)
        cv2.imwrite(os.path.join(out, name), drawn, [cv2.IMWRITE_JPEG_QUALITY, 90])
        parts.append(f'<figure><img src="{name}" alt="{_e(ia.file_name)}"><figcaption>{_e(ia.file_name)} (id '
                     f"{img_id}): found only by A {len(ia.found_ids() - ib.found_ids())}, only by B "
                     f"{len(ib.found_ids() - ia.found_ids())}; false A {ia.false}, B {ib.false}</figcaption>"
                     "</figure>")
    parts.append("</div>")
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"A": na, "B": nb, "summary": {t: {"A": a.summary[t], "B": b.summary[t]} for t in types},
                   "disagreements": [{"image_id": i, "score": s} for s, _, _, i in disagreements(a, b)[:100]]},
                  f, indent=1)
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(f"Comparison: {na} vs {nb}", "".join(parts)))
    return path
