"""``MODEL.PVT_D2.PRETRAINED`` as a URL: downloaded once into a cache, never half.

:func:`resolve_pretrained` turns the config value into a local file:

* a local path is returned as it is (``~`` expanded);
* an ``http(s)://`` URL is looked up in the cache folder (:func:`cache_dir`:
  ``$PVT_D2_CACHE``, default ``<torch.hub.get_dir()>/pvt_d2``) under the name
  :func:`cache_path` gives it (the file name of :mod:`.sources` for the
  official checkpoints). When absent it is downloaded with ``urllib`` into a
  temporary file in the same folder, checked with the safe reader
  (:func:`.io.load_checkpoint_file`: complete and loadable) and only then
  renamed into place, atomically. A failed, partial or corrupt download is
  deleted: the cache holds complete files only.

Whatever goes wrong (offline, HTTP error, timeout, truncated or corrupt file,
a checkpoint that is not a direct download) raises :class:`WeightsDownloadError`
naming the URL, the exact file to put into the cache by hand, and how to train
from scratch on purpose; ``tools/train_net.py`` reports it as one ``ERROR:``
paragraph, exit status 2, before any training starts.
"""
import hashlib
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Optional
from urllib.parse import urlparse

import torch

from .io import CheckpointError, load_checkpoint_file
from .sources import source_for_url

__all__ = ["CACHE_ENV", "DEFAULT_TIMEOUT_S", "WeightsDownloadError", "is_url", "cache_dir", "cache_path",
           "resolve_pretrained", "download_to_cache", "prefetch_pretrained"]

logger = logging.getLogger(__name__)

#: Environment variable naming the cache folder.
CACHE_ENV = "PVT_D2_CACHE"
#: Seconds without an answer from the server before the download is given up.
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class WeightsDownloadError(CheckpointError):
    """The ImageNet checkpoint named by a URL is neither in the cache nor downloadable now."""


def is_url(path: str) -> bool:
    """Whether ``path`` is an ``http://`` or ``https://`` URL."""
    return urlparse(path).scheme in ("http", "https")


def cache_dir() -> str:
    """The download cache: ``$PVT_D2_CACHE``, else ``pvt_d2`` under torch hub's folder."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join(torch.hub.get_dir(),
                                                                                       "pvt_d2")))


def cache_path(url: str) -> str:
    """Where the file of ``url`` lives in the cache.

    The official checkpoints of :mod:`.sources` keep their table's file name;
    any other URL gets its own file name prefixed with 8 hex digits of the
    URL's SHA-256 (two URLs ending in ``model.safetensors`` never collide).
    """
    source = source_for_url(url)
    if source is not None:
        name = source.filename
    else:
        base = os.path.basename(urlparse(url).path) or "checkpoint"
        name = f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base}"
    return os.path.join(cache_dir(), name)


def _advice(url: str, dest: str) -> str:
    return (f"Download it yourself and save it as\n  {dest}\n(the cache folder is ${CACHE_ENV}, default "
            f"<torch hub dir>/pvt_d2), or set MODEL.PVT_D2.PRETRAINED to a local checkpoint file. To train the "
            f"backbone from scratch on purpose, set MODEL.PVT_D2.PRETRAINED \"\".")


def resolve_pretrained(path: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The local file ``MODEL.PVT_D2.PRETRAINED`` names, downloading a URL into the cache first.

    Args:
        path: a local file or an http(s) URL.
        timeout: seconds to wait for the server at any one time.

    Returns:
        A local path (the cached file for a URL).

    Raises:
        WeightsDownloadError: a URL that is not cached and cannot be
            downloaded completely now.
    """
    if not is_url(path):
        return os.path.expanduser(path)
    dest = cache_path(path)
    if os.path.isfile(dest):
        logger.info(f"ImageNet weights {path}: using the cached {dest}")
        return dest
    source = source_for_url(path)
    if source is not None and source.manual:
        raise WeightsDownloadError(
            f"The ImageNet weights of {source.arch} (MODEL.PVT_D2.PRETRAINED = {path}) are not a direct download "
            f"({source.note}) and are not in the cache. Open that link in a browser. " + _advice(path, dest))
    return download_to_cache(path, dest, timeout)


def download_to_cache(url: str, dest: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Download ``url`` to ``dest`` (default :func:`cache_path`) atomically, checked by the safe reader.

    Returns:
        ``dest``.

    Raises:
        WeightsDownloadError: see :func:`resolve_pretrained`; nothing is left
            at ``dest`` nor in a temporary file then.
    """
    dest = dest or cache_path(url)
    folder = os.path.dirname(dest)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(dest) + ".", suffix=".part")
    except OSError as e:
        raise WeightsDownloadError(f"Cannot write the ImageNet weights {url} into the cache folder {folder}: {e}. "
                                   f"Set ${CACHE_ENV} to a writable folder. " + _advice(url, dest)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            size = _fetch(url, f, timeout)
        try:
            load_checkpoint_file(tmp)
        except CheckpointError as e:
            raise _DownloadFailed(f"the downloaded file ({size} bytes) is not a usable checkpoint: "
                                  f"{str(e).replace(tmp, 'it')}") from None
        os.replace(tmp, dest)
    except _DownloadFailed as e:
        raise WeightsDownloadError(f"Could not download the ImageNet weights MODEL.PVT_D2.PRETRAINED = {url}: {e}. "
                                   + _advice(url, dest)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info(f"Downloaded {url} ({size / 2 ** 20:.1f} MiB) to {dest}")
    return dest


class _DownloadFailed(Exception):
    """Why a download did not give a complete checkpoint (internal; reported as WeightsDownloadError)."""


def _fetch(url: str, out, timeout: float) -> int:
    """Stream ``url`` into the open file ``out``; the number of bytes, all of them, or :class:`_DownloadFailed`."""
    request = urllib.request.Request(url, headers={"User-Agent": "pvt_d2"})
    logger.info(f"Downloading {url} ...")
    start = time.time()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as e:
        raise _DownloadFailed(f"the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _DownloadFailed(f"no answer within {timeout:g} s") from None
        raise _DownloadFailed(f"cannot reach the server, offline? ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise _DownloadFailed(f"the download stalled for {timeout:g} s after {received} bytes") from None
    except (HTTPException, OSError) as e:  # IncompleteRead, connection reset, ...
        raise _DownloadFailed(f"the download broke off after {received} bytes ({type(e).__name__}: {e})") from None
    if expected is not None and received != expected:
        raise _DownloadFailed(f"the download is truncated: {received} of {expected} bytes arrived")
    logger.info(f"Downloaded {received} bytes in {time.time() - start:.1f} s")
    return received


def prefetch_pretrained(cfg) -> None:
    """Have ``MODEL.PVT_D2.PRETRAINED`` in the cache before any model is built, downloaded once per machine.

    In a multi-process run the first process of each machine downloads while
    the others wait; a failure raises :class:`WeightsDownloadError` there (the
    launcher then stops the others). Nothing happens for a local path or ``""``.
    """
    url = cfg.MODEL.PVT_D2.PRETRAINED
    if not is_url(url) or cfg.MODEL.WEIGHTS:  # MODEL.WEIGHTS replaces them: the builder does not load them
        return
    from detectron2.utils import comm

    if comm.get_local_rank() == 0:
        resolve_pretrained(url)
    comm.synchronize()
