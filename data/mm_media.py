"""Real media with captions and transcripts, fetched at set-up time by package name.

Nothing here is drawn, recorded or written by us, and nothing comes from a model/data hub:

==================  ===========================================================  ============
source              what                                                         license
==================  ===========================================================  ============
skimage             scikit-image's bundled sample images; caption = first line   per image,
                    of the loader's docstring ("Chelsea the cat.")               see README
sklearn             scikit-learn's two sample photos (china.jpg, flower.jpg);     CC BY 2.0
                    caption = the file's name
matplotlib          matplotlib's sample ``grace_hopper.jpg``; caption = name     matplotlib
tuxpaint            Debian ``tuxpaint-stamps-default``: ~800 PNG stamps with      GPL-2+
                    English descriptions (first line of NAME.txt); 66 also have
                    a spoken English description (NAME_desc.ogg)
asterisk            Debian ``asterisk-core-sounds-en-wav`` recordings (8 kHz)    CC BY-SA 3.0
                    with transcripts from ``asterisk-core-sounds-en``'s
                    core-sounds-en.txt
==================  ===========================================================  ============

Debian packages are fetched with ``apt-get download`` into the cache and unpacked there
with ``dpkg-deb --fsys-tarfile`` (no root, nothing installed); a package already installed
under /usr/share is used in place. A source that cannot be had is reported in
``MediaCollection.notes`` and skipped; the run continues with what it has.
"""

from __future__ import annotations

import gzip
import inspect
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmfm.errors import MmfmError, UserValueError

MEDIA_SOURCES = ("skimage", "sklearn", "matplotlib", "tuxpaint", "asterisk")
TUXPAINT_PKG = "tuxpaint-stamps-default"
ASTERISK_WAV_PKG = "asterisk-core-sounds-en-wav"
ASTERISK_TEXT_PKG = "asterisk-core-sounds-en"
# skimage.data callables that are not bundled photographs (generators, stacks, file names).
_SKIMAGE_SKIP = {"binary_blobs", "download_all", "file_hash", "lfw_subset",
                 "lbp_frontal_face_cascade_filename", "data_dir"}


@dataclass
class MediaItem:
    """One real media file and the text that describes it."""

    source: str  # one of MEDIA_SOURCES
    name: str  # stable id within the source, e.g. "animals/mammals/cat"
    kind: str  # "image" or "audio"
    data: bytes  # the encoded file (png, jpg, wav, ogg)
    fmt: str  # its extension
    text: str  # caption (images) or transcript (audio)
    license: str
    group: str = ""  # items of a group (a stamp category, a sound folder) share documents
    speech: MediaItem | None = None  # a spoken version of the caption, when there is one


@dataclass
class MediaCollection:
    items: list[MediaItem] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"} skipped

    def by_source(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.source] = counts.get(item.source, 0) + 1
        return counts


def collect_media(sources: list[str], cache_dir: str | Path,
                  max_per_source: int | None = None) -> MediaCollection:
    """Fetch and read the named media sources; a missing one becomes a note, not an error."""
    readers: dict[str, Callable[[Path], list[MediaItem]]] = {
        "skimage": lambda c: skimage_images(), "sklearn": lambda c: sklearn_images(),
        "matplotlib": lambda c: matplotlib_images(), "tuxpaint": tuxpaint_stamps,
        "asterisk": asterisk_sounds}
    collection = MediaCollection()
    cache = Path(cache_dir).expanduser()
    for source in sources:
        if source not in readers:
            raise UserValueError(f"unknown media source {source!r}; known: {', '.join(MEDIA_SOURCES)}")
        try:
            items = readers[source](cache)
        except MediaUnavailable as err:
            collection.notes.append({"source": source, "reason": str(err)})
            continue
        collection.items.extend(items[:max_per_source])
    return collection


class MediaUnavailable(MmfmError, RuntimeError):
    """A media source that cannot be had on this machine (package missing, no network)."""


# ----------------------------------------------------------------------------- PyPI packages

def skimage_images() -> list[MediaItem]:
    """scikit-image's sample images that load offline, as PNG, captioned by their loader."""
    try:
        import skimage.data

        from mmfm.encoders.media import encode_png
    except ImportError as err:
        raise MediaUnavailable(f"scikit-image is not installed ({err})") from None
    items = []
    for name in sorted(getattr(skimage.data, "__all__", dir(skimage.data))):
        loader = getattr(skimage.data, name, None)
        if name.startswith("_") or name in _SKIMAGE_SKIP or not callable(loader):
            continue
        array = _try_load(loader)
        if array is None:
            continue  # needs pooch + a download, or is not a 2-D image
        caption = (inspect.getdoc(loader) or name).splitlines()[0].strip()
        items.append(MediaItem("skimage", name, "image", encode_png(array), "png", caption,
                               "see skimage/data/README.txt", group="skimage"))
    return items


def _try_load(loader: Callable):
    import numpy as np

    try:
        array = loader()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - any failure means "not available offline"; under
        return None  # pytest, skimage's fetcher raises pytest's Skipped (a BaseException)
    ok = isinstance(array, np.ndarray) and (array.ndim == 2 or (
        array.ndim == 3 and array.shape[2] in (3, 4)))
    return array if ok else None


def sklearn_images() -> list[MediaItem]:
    """scikit-learn's sample photos, stored as their original JPEG bytes."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise MediaUnavailable(f"scikit-learn is not installed ({err})") from None
    return [MediaItem("sklearn", Path(f).stem, "image", Path(f).read_bytes(), "jpg",
                      Path(f).stem, "CC BY 2.0 (see sklearn load_sample_images DESCR)",
                      group="sklearn")
            for f in load_sample_images().filenames]


def matplotlib_images() -> list[MediaItem]:
    """matplotlib's sample photograph of Grace Hopper."""
    try:
        from matplotlib import cbook
    except ImportError as err:
        raise MediaUnavailable(f"matplotlib is not installed ({err})") from None
    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return [MediaItem("matplotlib", "grace_hopper", "image", path.read_bytes(), "jpg",
                      "Grace Hopper", "matplotlib license (sample data)", group="matplotlib")]


# ----------------------------------------------------------------------------- Debian packages

def debian_package_root(package: str, cache: Path, wanted: Callable[[str], bool]) -> Path:
    """A directory holding the package's files: `/` if it is installed, else the package
    downloaded with `apt-get download` and unpacked (only `wanted` members) into the cache."""
    if Path(f"/usr/share/doc/{package}/copyright").is_file():
        return Path("/")
    root = cache / "debian" / package
    done = root / ".unpacked"
    if done.is_file():
        return root
    deb = _download_deb(package, cache / "debian")
    _unpack(deb, root, wanted)
    done.write_text(deb.name)
    deb.unlink()  # the unpacked files are what we keep (the stamps .deb alone is 161 MB)
    return root


def _download_deb(package: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    found = sorted(where.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    err = _apt_download(package, where)
    if err and "Unable to locate" in err and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        err = _apt_download(package, where)
    found = sorted(where.glob(f"{package}_*.deb"))
    if not found:
        raise MediaUnavailable(f"Debian package {package} could not be downloaded "
                               f"(`apt-get download {package}`: {(err or '').strip()[-200:]})")
    return found[-1]


def _apt_download(package: str, where: Path) -> str | None:
    try:
        proc = subprocess.run(["apt-get", "download", "-qq", package], cwd=where,
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if proc.returncode == 0 else proc.stderr


def _unpack(deb: Path, root: Path, wanted: Callable[[str], bool]) -> None:
    """Extract the wanted regular files of a .deb's data archive under `root`."""
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    except OSError as err:
        raise MediaUnavailable(f"dpkg-deb is not available to unpack {deb.name} ({err})") from None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if member.isfile() and ".." not in name and wanted(name):
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if proc.wait() != 0:
        raise MediaUnavailable(f"dpkg-deb could not unpack {deb}")


def _license_of(root: Path, package: str) -> str:
    path = root / f"usr/share/doc/{package}/copyright"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("License:"):
                return line.split(":", 1)[1].strip()
    return "see the package's copyright file"


def tuxpaint_stamps(cache: Path) -> list[MediaItem]:
    """Tux Paint stamps: PNG images with their English description (first line of NAME.txt),
    and the spoken English description (NAME_desc.ogg) where the package has one."""
    stamps = "usr/share/tuxpaint/stamps/"

    def wanted(name: str) -> bool:
        return name.startswith(f"usr/share/doc/{TUXPAINT_PKG}/") or (name.startswith(stamps) and (
            name.endswith((".png", ".txt", "_desc.ogg"))))

    root = debian_package_root(TUXPAINT_PKG, cache, wanted)
    license_ = _license_of(root, TUXPAINT_PKG)
    items = []
    for png in sorted((root / stamps).rglob("*.png")):
        caption = _first_line(png.with_suffix(".txt"))
        if not caption:
            continue
        rel = png.relative_to(root / stamps).with_suffix("").as_posix()
        item = MediaItem("tuxpaint", rel, "image", png.read_bytes(), "png", caption, license_,
                         group=str(Path(rel).parent))
        speech = png.with_name(f"{png.stem}_desc.ogg")
        if speech.is_file():
            item.speech = MediaItem("tuxpaint", f"{rel}_desc", "audio", speech.read_bytes(),
                                    "ogg", caption, license_, group=item.group)
        items.append(item)
    if not items:
        raise MediaUnavailable(f"{TUXPAINT_PKG} holds no captioned PNG stamps under {root / stamps}")
    return items


def _first_line(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def asterisk_sounds(cache: Path) -> list[MediaItem]:
    """Asterisk's English prompts (8 kHz WAV) with their transcripts."""
    sounds = "usr/share/asterisk/sounds/"

    def wanted_wav(name: str) -> bool:
        return name.endswith(".wav") or name.startswith(f"usr/share/doc/{ASTERISK_WAV_PKG}/")

    def wanted_text(name: str) -> bool:
        return name.startswith(f"usr/share/doc/{ASTERISK_TEXT_PKG}/")

    wav_root = debian_package_root(ASTERISK_WAV_PKG, cache, wanted_wav)
    text_root = debian_package_root(ASTERISK_TEXT_PKG, cache, wanted_text)
    transcripts = _asterisk_transcripts(text_root)
    license_ = _license_of(wav_root, ASTERISK_WAV_PKG)
    items = []
    for wav in sorted((wav_root / sounds).rglob("*.wav")):
        rel = wav.relative_to(wav_root / sounds).as_posix()
        key = rel.split("/", 1)[1].removesuffix(".wav") if "/" in rel else rel  # drop voice dir
        text = transcripts.get(key, "")
        if text and not text.startswith("["):  # "[this is a simple beep tone]" is no speech
            items.append(MediaItem("asterisk", key, "audio", wav.read_bytes(), "wav", text,
                                   license_, group=str(Path(key).parent)))
    if not items:
        raise MediaUnavailable(f"no transcribed recordings found in {wav_root / sounds}")
    return items


def _asterisk_transcripts(root: Path) -> dict[str, str]:
    """{"digits/1": "One", ...} from core-sounds-en.txt(.gz)."""
    doc = root / f"usr/share/doc/{ASTERISK_TEXT_PKG}"
    path = next((p for p in (doc / "core-sounds-en.txt.gz", doc / "core-sounds-en.txt")
                 if p.is_file()), None)
    if path is None:
        raise MediaUnavailable(f"{ASTERISK_TEXT_PKG} has no core-sounds-en.txt transcript list")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    out = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if ":" in line and not line.startswith(";"):
            key, text = line.split(":", 1)
            out[key.strip()] = text.strip()
    return out
