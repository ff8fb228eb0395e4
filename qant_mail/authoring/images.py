"""Image files: their type and pixel size, read from their headers; and the copy readers
get, resized to twice its display width and recompressed (Pillow), made once and cached."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qant_mail.base.errors import OutputError, QantError
from qant_mail.base.files import read_head

# What mail clients display inline; SVG is left out on purpose (Gmail and Outlook drop it).
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
# No mail client shows a picture 30,000 pixels wide; a header that says so is damaged.
MAX_SIDE = 30_000


class ImageFileError(QantError):
    """An image file that is missing, unreadable or of a kind email cannot show."""


@dataclass(frozen=True)
class ImageInfo:
    """An image file's type and intrinsic size."""

    kind: str
    width: int
    height: int

    @property
    def mime_type(self) -> str:
        """Return the Content-Type to send the image with."""
        return MIME_TYPES[self.kind]


def probe(path: Path) -> ImageInfo:
    """Return the type and size of the image at `path`, reading only its header."""
    try:
        head = read_head(path, 64 * 1024)
    except FileNotFoundError as err:
        raise ImageFileError(f"image file not found: {path}") from err
    except IsADirectoryError as err:
        raise ImageFileError(f"not a file: {path}") from err
    except OSError as err:
        raise ImageFileError(f"cannot read image {path}: {err.strerror or err}") from err
    info = _parse(head)
    if info is None:
        raise ImageFileError(f"{path.name}: not a PNG, JPEG, GIF or WebP image")
    if not (0 < info.width <= MAX_SIDE and 0 < info.height <= MAX_SIDE):
        raise ImageFileError(
            f"{path.name}: its header says {info.width}×{info.height} pixels; "
            "the file is damaged (or absurdly large)"
        )
    return info


def _parse(head: bytes) -> ImageInfo | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return ImageInfo("png", width, height)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", head[6:10])
        return ImageInfo("gif", width, height)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(head)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(head)
    return None


def _jpeg(head: bytes) -> ImageInfo | None:
    # Walk the segments to the first start-of-frame marker, which holds the size.
    pos = 2
    while pos + 9 < len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return ImageInfo("jpeg", width, height)
        pos += 2 + length
    return None


def _webp(head: bytes) -> ImageInfo | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return ImageInfo("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return ImageInfo("webp", width, height)
    return None


# JPEG quality where artefacts stay invisible at the size shown; WebP likewise.
_JPEG_QUALITY = 82
_WEBP_QUALITY = 80


def prepared(path: Path, info: ImageInfo, width: int, cache: Path) -> Path:
    """Return a copy of the image at `path` at most `width` pixels wide, recompressed,
    from `cache` when made before (keyed by the file's content); the file itself when
    that would be no smaller, or when it is a GIF (an animation must stay one)."""
    if info.kind == "gif":
        return path
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:24]
    target = cache / f"{digest}-{width}.{'jpg' if info.kind == 'jpeg' else info.kind}"
    if target.exists():
        return target
    made = _recompress(data, info, width)
    if made is None or len(made) >= len(data):
        made = data  # cached all the same: the decision is not made again
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(made)
        made_file = Path(temporary)
        made_file.chmod(0o644)  # published as it is by `archive`
        made_file.replace(target)
    except OSError as err:
        # Named apart from the image: "cannot prepare logo.png" would send the user
        # looking at a file that is fine.
        raise OutputError(
            f"{cache}: cannot write the image cache: {err.strerror or err}"
            " (make it writable, or set [paths] cache to a folder you can write)"
        ) from err
    return target


def _recompress(data: bytes, info: ImageInfo, width: int) -> bytes | None:
    # Imported here: Pillow's import costs more than a render, and most renders hit the
    # cache.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            picture: Image.Image = opened
            if picture.width > width:
                height = max(1, round(picture.height * width / picture.width))
                picture = picture.resize((width, height), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            if info.kind == "jpeg":
                picture.convert("RGB").save(
                    out, "JPEG", quality=_JPEG_QUALITY, optimize=True, progressive=True
                )
            elif info.kind == "webp":
                picture.save(out, "WEBP", quality=_WEBP_QUALITY, method=6)
            else:
                picture.save(out, "PNG", optimize=True)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError):
        return None  # what the header promised, the file does not hold: sent as it is
