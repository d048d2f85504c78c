"""Where a detector fails: COCO metrics, error breakdown, confusion matrix and per-image errors.

Every number here comes from pycocotools' :class:`COCOeval`, the matching
detectron2's ``COCOEvaluator`` uses (greedy by score, one detection per
ground-truth object, crowd regions ignored):

* the COCO summary, per-class AP / recall and the precision-recall curves are
  slices of one COCOeval run whose IoU thresholds are COCO's ten (0.50:0.95)
  plus 0.1 (and the confusion threshold): each threshold is matched
  independently, so the COCO numbers equal detectron2's;
* the error breakdown (C75, C50, Loc, Sim, Oth, BG, FN) follows the COCO
  analysis of Hoiem et al. as mmdetection's ``coco_error_analysis.py`` plots
  it: Loc is the curve at IoU 0.1, Sim and Oth re-run COCOeval per class with
  the ground truth of similar (same supercategory) or of all other classes
  turned into ignored regions of that class, BG removes every remaining false
  positive and FN every miss;
* the per-image errors and the confusion matrix come from COCOeval's
  per-image matches (``evalImgs``) at one IoU threshold and score threshold;
  the class confusions are found by a second, class-agnostic COCOeval
  (``useCats=0``) between the false detections and the missed objects.

See docs/REPORT.md for where this follows mmdetection and where it differs.
"""
import contextlib
import io
import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["AREAS", "ERROR_TYPES", "ERROR_NAMES", "COCO_IOUS", "ReportInputError", "Analysis", "ImageResult",
           "load_ground_truth", "coco_from_dict", "check_results", "load_results", "analyze"]

AREAS = ("all", "small", "medium", "large")
ERROR_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
ERROR_NAMES = {
    "C75": "AP at IoU 0.75",
    "C50": "AP at IoU 0.50",
    "Loc": "AP at IoU 0.10 (localisation errors ignored)",
    "Sim": "Loc, and confusions with classes of the same supercategory removed",
    "Oth": "Loc, and every class confusion removed",
    "BG": "Oth, and every background false positive removed",
    "FN": "BG, and every missed object removed (always 1)",
}
COCO_IOUS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
LOC_IOU = 0.1
_MAX_DETS = (1, 10, 100)


class ReportInputError(ValueError):
    """An input the report cannot use (missing file, wrong kind of json, results of another dataset)."""


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' prints ("loading annotations...", "DONE (t=...)")."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_from_dict(dataset: Dict) -> COCO:
    """A :class:`COCO` object over an in-memory COCO dict (no file, no copy)."""
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def load_ground_truth(json_file: str) -> COCO:
    """Read a COCO annotation json.

    Raises:
        ReportInputError: unreadable file, or a json without ``images`` / ``annotations`` / ``categories``.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportInputError(f"cannot read the annotation file {json_file}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise ReportInputError(f"{json_file} is not a COCO annotation file (no 'images' / 'categories' lists)")
    data.setdefault("annotations", [])
    return coco_from_dict(data)


def check_results(results, gt: COCO, source: str, dataset: str) -> None:
    """Refuse anything that is not a COCO results list for the images and classes of ``gt``.

    Raises:
        ReportInputError: an annotation file passed as results, entries lacking fields, image or category
            ids that the dataset does not have (results of another dataset).
    """
    if isinstance(results, dict):
        if "annotations" in results or "images" in results:
            raise ReportInputError(f"{source} is a COCO annotation file (it has 'images' / 'annotations'), not "
                                   f"detection results; pass the evaluation's coco_instances_results.json")
        raise ReportInputError(f"{source} holds a json object, not a list of detections "
                               f"(coco_instances_results.json)")
    if not isinstance(results, list):
        raise ReportInputError(f"{source} is not a list of detections (coco_instances_results.json)")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score") if not isinstance(r, dict) or k not in r]
        if missing or not ("bbox" in r or "segmentation" in r):
            raise ReportInputError(f"{source}: detection #{i} lacks {', '.join(missing) or 'bbox/segmentation'} "
                                   f"(expected COCO results: image_id, category_id, bbox, score)")
    image_ids = {r["image_id"] for r in results}
    unknown = image_ids - set(gt.imgs)
    if unknown:
        example = ", ".join(str(i) for i in sorted(unknown, key=str)[:3])
        raise ReportInputError(f"{source}: {len(unknown)} of the {len(image_ids)} image ids of the results "
                               f"(e.g. {example}) are not images of dataset '{dataset}'; these are results of "
                               f"another dataset (name the right one with --dataset)")
    cats = {r["category_id"] for r in results} - set(gt.cats)
    if cats:
        raise ReportInputError(f"{source}: category ids {sorted(cats, key=str)[:5]} are not categories of "
                               f"dataset '{dataset}' ({sorted(gt.cats)}); results of another dataset?")


def load_results(path: str, gt: COCO, dataset: str) -> List[Dict]:
    """Read and check a ``coco_instances_results.json`` against the dataset ``gt``.

    Raises:
        ReportInputError: see :func:`check_results`; also an unreadable file.
    """
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportInputError(f"cannot read the results {path}: {e}") from None
    check_results(results, gt, path, dataset)
    return results


def _detections(gt: COCO, results: Sequence[Dict], iou_type: str) -> COCO:
    """The results as a COCO object for ``iou_type``, as ``COCO.loadRes`` builds it.

    For ``segm`` the box is derived from the mask (detectron2 drops the predicted box before its segm
    evaluation), and ``area`` is the mask's area; for ``bbox`` it is the box's area. Ids count from 1.
    """
    anns = []
    for i, r in enumerate(results):
        ann = {"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"], "score": float(r["score"]),
               "iscrowd": 0}
        if iou_type == "segm":
            ann["segmentation"] = r["segmentation"]
            ann["area"] = float(mask_util.area(r["segmentation"]))
            ann["bbox"] = [float(v) for v in mask_util.toBbox(r["segmentation"])]
        else:
            box = r["bbox"] if "bbox" in r else mask_util.toBbox(r["segmentation"])
            x, y, w, h = (float(v) for v in box)
            ann["bbox"] = [x, y, w, h]
            ann["area"] = w * h
        anns.append(ann)
    return coco_from_dict({"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                           "annotations": anns})


class _TickingCOCOeval(COCOeval):
    """COCOeval that advances a progress callback once per image and class it computes."""

    def __init__(self, gt, dt, iou_type, tick: Optional[Callable[[int], None]] = None):
        super().__init__(gt, dt, iou_type)
        self._tick = tick

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        """COCOeval's IoU computation, with a progress tick."""
        if self._tick:
            self._tick(1)
        return super().computeIoU(imgId, catId)

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802,N803
        """COCOeval's per-image matching, with a progress tick."""
        if self._tick:
            self._tick(1)
        return super().evaluateImg(imgId, catId, aRng, maxDet)


def _run_cocoeval(gt: COCO, dt: COCO, iou_type: str, iou_thrs, *, img_ids=None, cat_ids=None, use_cats=True,
                  area_rng=None, max_dets=_MAX_DETS, tick=None) -> COCOeval:
    ev = _TickingCOCOeval(gt, dt, iou_type, tick)
    p = ev.params
    p.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    p.maxDets = list(max_dets)
    p.useCats = int(use_cats)
    if img_ids is not None:
        p.imgIds = sorted(img_ids)
    if cat_ids is not None:
        p.catIds = list(cat_ids)
    if area_rng is not None:
        p.areaRng = [list(a) for a in area_rng]
        p.areaRngLbl = list(AREAS[:len(area_rng)])
    with _quiet():
        ev.evaluate()
        ev.accumulate()
    return ev


def _work(num_images: int, num_cats: int, num_areas: int) -> int:
    """Progress units of one COCOeval run: IoUs per (image, class), matchings per (image, class, area)."""
    return num_images * num_cats * (1 + num_areas)


def _mean(x: np.ndarray) -> float:
    """COCO's mean: over entries > -1 (-1 = no ground truth there); -1 when there is none."""
    x = np.asarray(x)
    valid = x[x > -1]
    return float(valid.mean()) if valid.size else -1.0


def _index(values, value: float) -> int:
    i = int(np.argmin(np.abs(np.asarray(values) - value)))
    if abs(values[i] - value) > 1e-9:
        raise ValueError(f"IoU {value} was not evaluated")
    return i


@dataclass
class ImageResult:
    """The matches of one image at the report's IoU and score thresholds (bbox unless stated).

    Attributes:
        image_id: COCO image id.
        file_name: as in the annotation file.
        dets: ``(det_id, category_id, score, [x, y, w, h], state, other_category)``; state is ``tp``,
            ``cls`` (a class confusion: overlaps a missed object of ``other_category``), ``fp`` (no missed
            object overlaps it: background, duplicate or badly localised) or ``ign`` (on a crowd region).
        gts: ``(gt_id, category_id, [x, y, w, h], state, other_category)``; state ``tp`` (found), ``cls``
            (missed, but a detection of ``other_category`` overlaps it), ``fn`` (missed) or ``ign`` (crowd).
    """

    image_id: int
    file_name: str
    dets: List[tuple] = field(default_factory=list)
    gts: List[tuple] = field(default_factory=list)

    def count(self, kind: str, state) -> int:
        """Number of detections (``kind="dets"``) or objects (``"gts"``) in ``state`` (a str or a tuple)."""
        states = (state,) if isinstance(state, str) else state
        rows = self.dets if kind == "dets" else self.gts
        return sum(1 for r in rows if r[-2] in states)

    @property
    def missed(self) -> int:
        """Objects not found."""
        return self.count("gts", ("fn", "cls"))

    @property
    def false(self) -> int:
        """False detections (class confusions included)."""
        return self.count("dets", ("fp", "cls"))

    def found_ids(self) -> set:
        """Ids of the objects found."""
        return {g[0] for g in self.gts if g[-2] == "tp"}


@dataclass
class Analysis:
    """Everything the report shows for one results file (numbers in [0, 1] unless stated).

    Attributes:
        dataset: dataset name.
        classes: class names, in category-id order.
        cat_ids: COCO category ids, same order.
        iou_types: ``bbox`` and, when the results have masks and the ground truth too, ``segm``.
        num_images / num_gt / num_dets: counts (ground truth without crowd regions).
        score_thr / iou_thr: thresholds of the confusion matrix and the per-image errors.
        summary: ``{iou_type: {"AP": .., "AP50": .., ..., "ARl": ..}}`` as COCOeval's summarize.
        per_class: ``{iou_type: [{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "R50", "TP", "FP", "FN"}]}``.
        recall_thrs: the 101 recall points of the curves.
        pr: ``{iou_type: {"0.50": array K x 101, "0.75": array K x 101}}`` precision (-1 = no ground truth).
        breakdown: ``{iou_type: array 7 x 101 x K x 4}``: precision per error type, recall, class, area.
        breakdown_valid: ``{iou_type: bool array K x 4}``: the class has ground truth in that area.
        confusion: ``{iou_type: int array (K+1) x (K+1)}``: rows ground truth, columns predictions, last
            row / column background (a false detection / a missed object).
        images: per-image matches (bbox).
    """

    dataset: str
    classes: List[str]
    cat_ids: List[int]
    iou_types: List[str]
    num_images: int
    num_gt: int
    num_dets: int
    score_thr: float
    iou_thr: float
    summary: Dict[str, Dict[str, float]] = field(default_factory=dict)
    per_class: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)
    recall_thrs: Optional[np.ndarray] = None
    pr: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    breakdown: Dict[str, np.ndarray] = field(default_factory=dict)
    breakdown_valid: Dict[str, np.ndarray] = field(default_factory=dict)
    confusion: Dict[str, np.ndarray] = field(default_factory=dict)
    images: List[ImageResult] = field(default_factory=list)

    def breakdown_table(self, iou_type: str, area: str = "all", cls: Optional[int] = None) -> Dict[str, float]:
        """AP of each error type (mean over recall, and over the classes with ground truth unless ``cls``)."""
        ps, valid = self.breakdown[iou_type], self.breakdown_valid[iou_type]
        a = AREAS.index(area)
        classes = [cls] if cls is not None else range(len(self.classes))
        keep = [k for k in classes if valid[k, a]]
        if not keep:
            return {t: -1.0 for t in ERROR_TYPES}
        return {t: float(ps[i][:, keep, a].mean()) for i, t in enumerate(ERROR_TYPES)}

    def to_json(self) -> Dict:
        """The numbers of the report as plain json (curves and per-image detections left out)."""
        out = {k: getattr(self, k) for k in ("dataset", "classes", "cat_ids", "iou_types", "num_images", "num_gt",
                                             "num_dets", "score_thr", "iou_thr", "summary", "per_class")}
        out["breakdown"] = {
            t: {"overall": {a: self.breakdown_table(t, a) for a in AREAS},
                "per_class": {c: self.breakdown_table(t, "all", k) for k, c in enumerate(self.classes)}}
            for t in self.iou_types}
        out["confusion"] = {t: {"labels": self.classes + ["background"], "rows_ground_truth": m.tolist()}
                            for t, m in self.confusion.items()}
        out["images"] = [{"image_id": im.image_id, "file_name": im.file_name, "missed": im.missed,
                          "false": im.false, "found": im.count("gts", "tp")} for im in self.images]
        return out


def _summary(precision: np.ndarray, recall: np.ndarray, ious: np.ndarray, max_dets: Sequence[int]) -> Dict:
    """COCOeval.summarize's twelve numbers from the accumulated arrays (only COCO's ten IoUs averaged)."""
    coco_t = [_index(ious, v) for v in COCO_IOUS]
    t50, t75 = _index(ious, 0.5), _index(ious, 0.75)
    m100 = list(max_dets).index(100)
    p = precision[coco_t]
    r = recall[coco_t]
    return {
        "AP": _mean(p[..., 0, m100]), "AP50": _mean(precision[t50, ..., 0, m100]),
        "AP75": _mean(precision[t75, ..., 0, m100]),
        "APs": _mean(p[..., 1, m100]), "APm": _mean(p[..., 2, m100]), "APl": _mean(p[..., 3, m100]),
        "AR1": _mean(r[..., 0, list(max_dets).index(1)]), "AR10": _mean(r[..., 0, list(max_dets).index(10)]),
        "AR100": _mean(r[..., 0, m100]),
        "ARs": _mean(r[..., 1, m100]), "ARm": _mean(r[..., 2, m100]), "ARl": _mean(r[..., 3, m100]),
    }


def _class_similarity_groups(gt: COCO) -> Dict[int, set]:
    """Category id -> ids of the other categories of its supercategory (none without a supercategory)."""
    groups = {}
    for cid, cat in gt.cats.items():
        sup = cat.get("supercategory")
        groups[cid] = {o for o, c in gt.cats.items() if o != cid and sup and c.get("supercategory") == sup}
    return groups


def _ignore_other_classes(gt: COCO, img_ids: Sequence[int], cat_id: int, others: set) -> COCO:
    """The ground truth of ``img_ids`` for class ``cat_id``, objects of the classes ``others`` made ignored
    crowd regions of ``cat_id`` (a detection on one of them is then neither a hit nor a false positive)."""
    anns = []
    for img in img_ids:
        for ann in gt.imgToAnns.get(img, []):
            if ann["category_id"] == cat_id:
                anns.append(ann)
            elif ann["category_id"] in others:
                anns.append(dict(ann, category_id=cat_id, iscrowd=1, ignore=1))
    images = [gt.imgs[i] for i in img_ids]
    return coco_from_dict({"images": images, "annotations": anns, "categories": gt.dataset["categories"]})


def _breakdown(gt: COCO, dt: COCO, ev: COCOeval, iou_type: str, tick) -> (np.ndarray, np.ndarray):
    """Precision of the seven error types, ``7 x R x K x A`` at 100 detections per image, and its validity."""
    p = ev.params
    m100 = list(p.maxDets).index(100)
    prec = ev.eval["precision"][..., m100]  # T x R x K x A
    cat_ids = list(p.catIds)
    num_r, num_k, num_a = prec.shape[1], prec.shape[2], prec.shape[3]
    ps = np.zeros((len(ERROR_TYPES), num_r, num_k, num_a))
    ps[0] = prec[_index(p.iouThrs, 0.75)]
    ps[1] = prec[_index(p.iouThrs, 0.5)]
    ps[2] = prec[_index(p.iouThrs, LOC_IOU)]
    valid = (ps[2] > -1).any(axis=0)  # K x A: the class has ground truth in that area
    similar = _class_similarity_groups(gt)
    every = set(cat_ids)
    for k, cid in enumerate(cat_ids):
        img_ids = sorted(set(gt.catToImgs.get(cid, [])) | set(dt.catToImgs.get(cid, [])))
        if not img_ids:
            continue
        dets = [a for i in img_ids for a in dt.imgToAnns.get(i, []) if a["category_id"] == cid]
        dt_k = coco_from_dict({"images": [gt.imgs[i] for i in img_ids], "annotations": dets,
                               "categories": gt.dataset["categories"]})
        results = {}
        for row, others in ((4, every - {cid}), (3, similar[cid])):
            if row == 3 and not others:  # no similar class: nothing to remove beyond Loc
                results[row] = ps[2][:, k]
                continue
            if row == 3 and others == every - {cid}:  # every other class is similar: Sim = Oth
                results[row] = results[4]
                continue
            ev_k = _run_cocoeval(_ignore_other_classes(gt, img_ids, cid, others), dt_k, iou_type, [LOC_IOU],
                                 img_ids=img_ids, cat_ids=[cid], max_dets=[100], tick=tick)
            results[row] = ev_k.eval["precision"][0, :, 0, :, 0]
        ps[3][:, k], ps[4][:, k] = results[3], results[4]
    ps[:5][ps[:5] < 0] = 0  # -1 (no ground truth) -> 0; such classes are left out of the means by ``valid``
    ps[5] = ps[4] > 0
    ps[6] = 1.0
    return ps, valid


def _image_matches(ev: COCOeval, iou_thr: float, score_thr: float, gt: COCO, images: Dict[int, ImageResult]):
    """Fill ``images`` with the detections (score >= ``score_thr``) and objects matched at ``iou_thr``.

    Dropping the detections under the score threshold after COCOeval's greedy, score-ordered matching
    gives the matching of the kept detections alone: a detection is matched before every lower-scored one.
    """
    p = ev.params
    t = _index(p.iouThrs, iou_thr)
    area_all = p.areaRng[0]
    dts = ev.cocoDt.anns
    for e in ev.evalImgs:
        if e is None or e["aRng"] != area_all:
            continue
        im = images[e["image_id"]]
        for d, did in enumerate(e["dtIds"]):
            if e["dtScores"][d] < score_thr:
                continue
            state = "ign" if e["dtIgnore"][t, d] else ("tp" if e["dtMatches"][t, d] > 0 else "fp")
            a = dts[did]
            im.dets.append([did, a["category_id"], a["score"], a["bbox"], state, None])
        for g, gid in enumerate(e["gtIds"]):
            a = gt.anns[gid]
            if e["gtIgnore"][g]:
                state = "ign"
            else:
                m = int(e["gtMatches"][t, g])
                state = "tp" if m > 0 and dts[m]["score"] >= score_thr else "fn"
            im.gts.append([gid, a["category_id"], a["bbox"], state, None])


def _confusion(gt: COCO, dt: COCO, iou_type: str, iou_thr: float, images: Dict[int, ImageResult],
               cat_ids: List[int], tick) -> np.ndarray:
    """Confusion matrix from the matches in ``images``; marks class confusions there (state ``cls``).

    Matched detections are the diagonal. The false detections and the missed objects are matched again
    by a class-agnostic COCOeval (``useCats=0``) at ``iou_thr``: a pair is a confusion (row: the object's
    class, column: the detection's), a false detection left over is background (last row), a missed
    object left over is a miss (last column). Each detection and each object is counted once.
    """
    k_of = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    cm = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    fp, fn, involved = [], [], set()
    for im in images.values():
        for d in im.dets:
            if d[4] == "tp":
                cm[k_of[d[1]], k_of[d[1]]] += 1
            elif d[4] == "fp":
                fp.append(dt.anns[d[0]])
                involved.add(im.image_id)
        for g in im.gts:
            if g[3] == "fn":
                fn.append(gt.anns[g[0]])
                involved.add(im.image_id)
    if not involved:
        return cm
    imgs = [gt.imgs[i] for i in sorted(involved)]
    cats = gt.dataset["categories"]
    gt2 = coco_from_dict({"images": imgs, "annotations": fn, "categories": cats})
    dt2 = coco_from_dict({"images": imgs, "annotations": fp, "categories": cats})
    ev = _run_cocoeval(gt2, dt2, iou_type, [iou_thr], img_ids=sorted(involved), use_cats=False,
                       area_rng=[[0, 1e5 ** 2]], max_dets=[10 ** 6], tick=tick)
    other_of_det, other_of_gt = {}, {}
    for e in ev.evalImgs:
        if e is None:
            continue
        for d, did in enumerate(e["dtIds"]):
            m = int(e["dtMatches"][0, d])
            dcat = dt2.anns[did]["category_id"]
            if m > 0:
                gcat = gt2.anns[m]["category_id"]
                cm[k_of[gcat], k_of[dcat]] += 1
                other_of_det[did], other_of_gt[m] = gcat, dcat
            else:
                cm[bg, k_of[dcat]] += 1
        for g, gid in enumerate(e["gtIds"]):
            if int(e["gtMatches"][0, g]) == 0:
                cm[k_of[gt2.anns[gid]["category_id"]], bg] += 1
    for im in images.values():
        for d in im.dets:
            if d[0] in other_of_det and d[4] == "fp":
                d[4], d[5] = "cls", other_of_det[d[0]]
        for g in im.gts:
            if g[0] in other_of_gt and g[3] == "fn":
                g[3], g[4] = "cls", other_of_gt[g[0]]
    return cm


def _has_masks(gt: COCO, results: Sequence[Dict]) -> bool:
    if not results or not all("segmentation" in r for r in results):
        return False
    return any(a.get("segmentation") for a in gt.anns.values() if not a.get("iscrowd", 0))


def analyze(gt: COCO, results: Sequence[Dict], dataset: str = "", *, iou_types: Optional[Sequence[str]] = None,
            score_thr: float = 0.5, iou_thr: float = 0.5, progress: bool = True) -> Analysis:
    """Compute every number of the report for one results list.

    Args:
        gt: the dataset's ground truth.
        results: checked COCO results (:func:`load_results`).
        dataset: the dataset's name (shown).
        iou_types: ``bbox`` / ``segm``; default: ``bbox``, and ``segm`` when results and ground truth have masks.
        score_thr: detections scoring lower are left out of the confusion matrix and the per-image errors.
        iou_thr: IoU at which a detection matches an object there.
        progress: show a progress bar (stderr).

    Returns:
        the :class:`Analysis`.
    """
    if iou_types is None:
        iou_types = ["bbox"] + (["segm"] if _has_masks(gt, results) else [])
    elif "segm" in iou_types and not _has_masks(gt, results):
        raise ReportInputError("a mask evaluation (segm) needs masks ('segmentation') in every detection and in "
                               "the ground truth")
    cat_ids = sorted(gt.getCatIds())
    classes = [gt.cats[c]["name"] for c in cat_ids]
    img_ids = sorted(gt.getImgIds())
    num_gt = sum(1 for a in gt.anns.values() if not a.get("iscrowd", 0))
    analysis = Analysis(dataset, classes, cat_ids, list(iou_types), len(img_ids), num_gt, len(results),
                        score_thr, iou_thr)
    ious = np.unique(np.round(np.concatenate([[LOC_IOU, iou_thr], COCO_IOUS]), 10))
    num_i, num_k = len(img_ids), len(cat_ids)
    # progress units: main run + two breakdown runs per class over that class's images (bounded by the main
    # run's size) + the confusion run (small)
    per_type = _work(num_i, num_k, 4) * 3 + num_i * 2
    bar = _progress_bar(per_type * len(iou_types), progress)
    try:
        for iou_type in iou_types:
            bar.set_description(f"{iou_type}: COCOeval")
            dt = _detections(gt, results, iou_type)
            ev = _run_cocoeval(gt, dt, iou_type, ious, img_ids=img_ids, cat_ids=cat_ids, tick=bar.update)
            prec, rec = ev.eval["precision"], ev.eval["recall"]
            analysis.summary[iou_type] = _summary(prec, rec, ious, ev.params.maxDets)
            analysis.recall_thrs = np.asarray(ev.params.recThrs)
            m100 = list(ev.params.maxDets).index(100)
            t50, t75 = _index(ious, 0.5), _index(ious, 0.75)
            analysis.pr[iou_type] = {"0.50": prec[t50, :, :, 0, m100].T.copy(),
                                     "0.75": prec[t75, :, :, 0, m100].T.copy()}
            bar.set_description(f"{iou_type}: error breakdown")
            start = bar.n
            analysis.breakdown[iou_type], analysis.breakdown_valid[iou_type] = _breakdown(gt, dt, ev, iou_type,
                                                                                          bar.update)
            bar.update(max(0, start + 2 * _work(num_i, num_k, 4) - bar.n))
            bar.set_description(f"{iou_type}: matches")
            images = {i: ImageResult(i, gt.imgs[i].get("file_name", str(i))) for i in img_ids}
            _image_matches(ev, iou_thr, score_thr, gt, images)
            analysis.confusion[iou_type] = _confusion(gt, dt, iou_type, iou_thr, images, cat_ids, None)
            bar.update(num_i * 2)
            coco_t = [_index(ious, v) for v in COCO_IOUS]
            cm = analysis.confusion[iou_type]
            dets_per_class = {c: 0 for c in cat_ids}
            for a in dt.anns.values():
                dets_per_class[a["category_id"]] += 1
            rows = []
            for k, cid in enumerate(cat_ids):
                rows.append({
                    "AP": _mean(prec[coco_t, :, k, 0, m100]), "AP50": _mean(prec[t50, :, k, 0, m100]),
                    "AP75": _mean(prec[t75, :, k, 0, m100]), "APs": _mean(prec[coco_t, :, k, 1, m100]),
                    "APm": _mean(prec[coco_t, :, k, 2, m100]), "APl": _mean(prec[coco_t, :, k, 3, m100]),
                    "AR": _mean(rec[coco_t, k, 0, m100]), "R50": _mean(rec[t50, k, 0, m100]),
                    "GT": int(cm[k, :].sum()), "dets": dets_per_class[cid], "TP": int(cm[k, k]),
                    "FN": int(cm[k, :].sum() - cm[k, k]), "FP": int(cm[:, k].sum() - cm[k, k]),
                })
            analysis.per_class[iou_type] = rows
            if iou_type == "bbox" or not analysis.images:
                analysis.images = [images[i] for i in img_ids]
    finally:
        bar.close()
    return analysis


class _NoBar:
    n = 0

    def update(self, k=1):
        self.n += k

    def set_description(self, text):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with detectron2's requirements
        return _NoBar()
    return tqdm(total=total, unit="step", unit_scale=True, dynamic_ncols=True, mininterval=0.5,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

