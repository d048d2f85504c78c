"""Tests of ``MODEL.PVT_D2.PRETRAINED`` as a URL (pvt_d2/checkpoint/download.py, sources.py).

No network is used: a local HTTP server on 127.0.0.1 (``http.server`` in a
thread, port 0) serves checkpoints the tests write, whole, truncated (short
body, or a header promising more than is sent) or not at all (404); an
unreachable port stands for being offline. The cache is a temporary
``$PVT_D2_CACHE``.
"""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from pvt_d2 import create_backbone
from pvt_d2.checkpoint import CheckpointError, load_pretrained_backbone
from pvt_d2.checkpoint.download import (CACHE_ENV, WeightsDownloadError, cache_dir, cache_path,
                                        resolve_pretrained)
from pvt_d2.checkpoint.sources import SOURCES, get_source, pretrained_url, source_for_url
from pvt_d2.modeling import list_architectures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


# ---------------------------------------------------------------------------
# A local file server
# ---------------------------------------------------------------------------
class _Server:
    """Serves ``routes[path] = (body, claimed_length)`` on 127.0.0.1; anything else is a 404."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        routes, requests = self.routes, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                if self.path not in routes:
                    self.send_error(404, "Not Found")
                    return
                body, length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = _Server()
    yield s
    if s.thread.is_alive():
        s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pvt_v2_b0_file(tmp_path) -> tuple:
    """A pvt_v2_b0 ImageNet checkpoint in timm's layout (with its classifier), as bytes; and its backbone weights."""
    torch.manual_seed(1)
    weights = {k: v.clone() for k, v in create_backbone("pvt_v2_b0").state_dict().items()}
    state = {**weights, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    path = tmp_path / "written.pth"
    torch.save({"state_dict": state, "epoch": 300}, path)
    return path.read_bytes(), weights


def _fresh_b0():
    torch.manual_seed(2)
    return create_backbone("pvt_v2_b0")


# ---------------------------------------------------------------------------
# The source table
# ---------------------------------------------------------------------------
def test_every_architecture_has_a_checkpoint_source():
    assert sorted(SOURCES) == sorted(list_architectures())
    names = [s.filename for s in SOURCES.values()]
    assert len(set(names)) == len(names)  # one cache file each
    for arch, source in SOURCES.items():
        assert source.origin in ("official", "timm")
        if arch.startswith(("pvt_", "levit_")):  # the authors' own direct downloads
            assert source.origin == "official" and not source.manual
        if source.available and not source.manual:
            assert re.fullmatch(r"https://\S+\.(pth|safetensors)", source.url), source
        assert source_for_url(source.url) is (source if source.available else None)
    assert pretrained_url("pvt_v2_b2") == "https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth"
    assert pretrained_url("levit_256") == "https://dl.fbaipublicfiles.com/LeViT/LeViT-256-13b5763e.pth"
    assert pretrained_url("twins_svt_small") == \
        "https://huggingface.co/timm/twins_svt_small.in1k/resolve/main/model.safetensors"
    assert get_source("vip_m7").manual and not get_source("vip_s14").available
    with pytest.raises(KeyError, match="pvt_v9.*known: gcvit_base"):
        get_source("pvt_v9")


def test_cache_folder_and_names(cache, monkeypatch):
    assert cache_dir() == str(cache)
    assert cache_path(pretrained_url("twins_pcpvt_base")) == str(cache / "twins_pcpvt_base.in1k.safetensors")
    assert cache_path(pretrained_url("pvt_tiny")) == str(cache / "pvt_tiny.pth")
    other = cache_path("https://example.org/a/model.safetensors")
    assert re.fullmatch(r"[0-9a-f]{8}-model\.safetensors", os.path.basename(other))
    assert other != cache_path("https://example.org/b/model.safetensors")
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == os.path.join(torch.hub.get_dir(), "pvt_d2")
    assert resolve_pretrained("~/x.pth") == os.path.expanduser("~/x.pth")  # local paths are left alone


# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------
def test_download_is_cached_then_loaded_strictly_and_reused_offline(server, cache, tmp_path, caplog):
    body, weights = _pvt_v2_b0_file(tmp_path)
    server.routes["/w/pvt_v2_b0.pth"] = (body, None)
    url = server.url("/w/pvt_v2_b0.pth")

    model = _fresh_b0()
    with caplog.at_level("INFO", logger="pvt_d2"):
        report = load_pretrained_backbone(model, url)
    dest = cache_path(url)
    assert os.listdir(cache) == [os.path.basename(dest)]  # the file, and no temporary left
    with open(dest, "rb") as f:
        assert f.read() == body
    assert report.ok and report.new == [] and sorted(report.dropped) == ["head.bias", "head.weight"]
    assert len(report.loaded) == len(weights)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert url in report.source and dest in report.source
    log = caplog.text
    assert f"Downloading {url}" in log and "| loaded" in log and "MISSING" in log  # the load table

    # second use: from the cache, the server is gone
    server.stop()
    assert server.requests == ["/w/pvt_v2_b0.pth"]
    model = _fresh_b0()
    report = load_pretrained_backbone(model, url)
    assert report.ok and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_safetensors_download(server, cache, tmp_path):
    _, weights = _pvt_v2_b0_file(tmp_path)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "m.safetensors"))
    server.routes["/timm/model.safetensors"] = ((tmp_path / "m.safetensors").read_bytes(), None)
    url = server.url("/timm/model.safetensors")
    model = _fresh_b0()
    assert load_pretrained_backbone(model, url).ok
    assert os.path.isfile(cache_path(url)) and len(os.listdir(cache)) == 1


def _assert_download_error(excinfo, url, dest):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, CheckpointError)  # what tools/train_net.py reports as a user error
    assert url in message and f"save it as\n  {dest}\n" in message
    assert 'MODEL.PVT_D2.PRETRAINED ""' in message and "from scratch" in message
    return message


@pytest.mark.parametrize("how", ["short_file", "connection_cut", "garbage"])
def test_truncated_or_corrupt_download_is_an_error_and_leaves_nothing(how, server, cache, tmp_path):
    body, _ = _pvt_v2_b0_file(tmp_path)
    half = body[: len(body) // 2]
    server.routes["/pvt_v2_b0.pth"] = {
        "short_file": (half, None),  # a complete response of a truncated file
        "connection_cut": (half, len(body)),  # the server promises the whole file and stops halfway
        "garbage": (b"<html>not a checkpoint</html>" * 100, None),
    }[how]
    url = server.url("/pvt_v2_b0.pth")
    model = _fresh_b0()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsDownloadError) as excinfo:
        load_pretrained_backbone(model, url)
    message = _assert_download_error(excinfo, url, cache_path(url))
    expected = {"short_file": r"not a usable checkpoint: it is truncated or corrupt",
                "connection_cut": rf"truncated: {len(half)} of {len(body)} bytes|broke off after {len(half)} bytes",
                "garbage": r"not a usable checkpoint: it is not a checkpoint"}[how]
    assert re.search(expected, message), message
    assert os.listdir(cache) == []  # neither the file nor a partial download stays
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_http_error_and_offline_name_url_and_cache_path(server, cache):
    url = server.url("/nowhere/pvt_v2_b0.pth")
    with pytest.raises(WeightsDownloadError) as excinfo:
        resolve_pretrained(url)
    assert "HTTP 404" in _assert_download_error(excinfo, url, cache_path(url))
    assert os.listdir(cache) == []

    offline = f"http://127.0.0.1:{_unused_port()}/pvt_v2_b0.pth"
    with pytest.raises(WeightsDownloadError) as excinfo:
        resolve_pretrained(offline)
    assert "cannot reach the server" in _assert_download_error(excinfo, offline, cache_path(offline))
    assert os.listdir(cache) == []


def test_manual_download_source_is_never_fetched_and_is_used_once_cached(cache):
    url = pretrained_url("vip_s7")
    with pytest.raises(WeightsDownloadError) as excinfo:
        resolve_pretrained(url)  # a Google Drive page: no request is made
    message = _assert_download_error(excinfo, url, str(cache / "vip_s7.pth"))
    assert "vip_s7" in message and "not a direct download" in message
    os.makedirs(cache)
    (cache / "vip_s7.pth").write_bytes(b"dropped in by hand")
    assert resolve_pretrained(url) == str(cache / "vip_s7.pth")


def test_coco_config_names_the_official_checkpoint_and_its_cache_file(cache):
    from pvt_d2.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "retinanet_pvt_s.yaml"))
    assert cfg.MODEL.PVT_D2.PRETRAINED == "https://github.com/whai362/PVT/releases/download/v2/pvt_small.pth"
    assert cache_path(cfg.MODEL.PVT_D2.PRETRAINED) == str(cache / "pvt_small.pth")


# ---------------------------------------------------------------------------
# The CLI: COCO laid out, no network / checkpoint in the cache
# ---------------------------------------------------------------------------
def _fake_coco(root) -> None:
    """What ``prepare_datasets`` needs of COCO 2017: the annotation files and image folders (one tiny image)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from PIL import Image

    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split in ("train2017", "val2017"):
        os.makedirs(root / "coco" / split)
        Image.new("RGB", (64, 48), (120, 30, 200)).save(root / "coco" / split / "000000000001.jpg")
        os.makedirs(root / "coco" / "annotations", exist_ok=True)
        with open(root / "coco" / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": [{"id": 1, "file_name": "000000000001.jpg", "height": 48, "width": 64}],
                       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 20],
                                        "area": 400, "iscrowd": 0}],
                       "categories": categories}, f)


@pytest.mark.slow
def test_train_net_without_network_stops_with_the_weights_message_then_uses_the_cache(tmp_path):
    datasets = tmp_path / "datasets"
    _fake_coco(datasets)
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{_unused_port()}/pvt_small.pth"
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO, "configs", "retinanet_pvt_s.yaml"),
            "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.PVT_D2.PRETRAINED", url]

    offline = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert offline.returncode == 2, offline.stderr[-3000:]
    errors = [line for line in offline.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and url in errors[0], offline.stderr[-3000:]
    dest = os.path.join(str(cache), os.path.basename(cache_path(url)))
    assert f"\n  {dest}\n" in offline.stderr and 'MODEL.PVT_D2.PRETRAINED ""' in offline.stderr
    assert "Traceback" not in offline.stderr and "RetinaNet(" not in offline.stderr  # before any model is built
    assert not os.path.exists(cache) or os.listdir(cache) == []

    # evaluating given weights needs no ImageNet weights: the error is about MODEL.WEIGHTS, not the download
    missing = str(tmp_path / "model_final.pth")
    evaluate = subprocess.run(args[:2] + ["--eval-only"] + args[2:] + ["MODEL.WEIGHTS", missing],
                              capture_output=True, text=True, timeout=300, env=env)
    assert evaluate.returncode == 2 and f"ERROR: Checkpoint file not found: {missing}" in evaluate.stderr, \
        evaluate.stderr[-3000:]
    assert url not in evaluate.stderr

    # the same command with the checkpoint in the cache: loaded with its table, then one tiny iteration
    torch.manual_seed(0)
    os.makedirs(cache, exist_ok=True)
    torch.save(create_backbone("pvt_small").state_dict(), dest)
    cached = subprocess.run(args + ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS",
                                    "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64"],
                            capture_output=True, text=True, timeout=300, env=env)
    log = cached.stdout + cached.stderr
    assert cached.returncode == 0, log[-3000:]
    assert f"using the cached {dest}" in log and "Loaded ImageNet weights for pvt_small" in log
    assert re.search(r"\| loaded\s+\|\s+\d+ \|", log) and "Starting training from iteration 0" in log
    assert log.index("Loaded ImageNet weights") < log.index("Starting training")
