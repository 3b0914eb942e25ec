"""Noto Color Emoji as image–caption pairs, read from the files three Debian packages install: a real
captioned data set that needs no download (docs/DATA.md, "Emoji captions").

- images: each fully-qualified emoji of ``emoji-test.txt`` (unicode-data) drawn with NotoColorEmoji.ttf
  (fonts-noto-color-emoji), a CBDT bitmap font whose only strike is 109 px: Pillow draws it at that size
  only, in colour only with ``embedded_color``. The glyph is laid on white, padded to a square and
  downscaled to IMAGE_SIZE, so the shards hold small RGB images as the CPU models want them.
- captions: the emoji's CLDR name (``emoji-test.txt`` carries it) and its CLDR keywords
  (unicode-cldr-core's ``annotations/en.xml``, then ``annotationsDerived/en.xml`` for skin tones and other
  variants), in CAPTION_TEMPLATE.
- labels: the emoji's group (``Component`` excluded), for kNN and zero-shot; the subgroup goes
  to the sample's .json.

Emoji the font draws identically (a flag shared by several regions, skin tones a glyph ignores) would be
pairs whose image says nothing about which caption is right; of each such set only the shortest name, the
most general, is kept. Emoji the font cannot draw as one glyph (a sequence newer than the font) are left
out. The held-out split is stratified by group, fixed by the split seed.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from dist_cl.data.shard_writer import ShardWriteError, Source, array_source

INSTALL = "apt-get install -y fonts-noto-color-emoji unicode-cldr-core unicode-data"
PACKAGE_FILES = {
    "font": ("fonts-noto-color-emoji", "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    "annotations": ("unicode-cldr-core", "usr/share/unicode/cldr/common/annotations/en.xml"),
    "derived": ("unicode-cldr-core", "usr/share/unicode/cldr/common/annotationsDerived/en.xml"),
    "emoji_test": ("unicode-data", "usr/share/unicode/emoji/emoji-test.txt"),
}
"""Each file read, as (the Debian package that installs it, its path under the file system root)."""
GLYPH_SIZE = 109
"""The font's one bitmap strike: FreeType refuses any other size for a CBDT font."""
IMAGE_SIZE = 48
"""Side of the stored square images, in pixels."""
CAPTION_TEMPLATE = "{name} ({keywords})"
"""A caption: the CLDR name, then the keywords that do not repeat it; the bare name where none is left.
Parentheses, not a colon: CLDR names of variants hold one already ("thumbs up: medium skin tone")."""
EXCLUDED_GROUP = "Component"
"""Skin tones and hair styles alone: parts of other emoji, listed as ``component``, not fully-qualified."""
VARIATION_SELECTOR = "\ufe0f"
"""Emoji presentation selector: CLDR's annotation keys leave it out, emoji-test.txt's fully-qualified keep it."""


class EmojiDataError(ShardWriteError):
    """The Debian files are missing or unreadable, or Pillow cannot draw emoji sequences."""


@dataclass(frozen=True)
class Emoji:
    text: str
    """The fully-qualified code point sequence."""
    name: str
    """CLDR's short name, as emoji-test.txt gives it (e.g. "thumbs up: medium skin tone")."""
    group: str
    subgroup: str
    keywords: tuple[str, ...] = ()
    """CLDR's keywords, as annotations list them (sorted); empty for emoji newer than the CLDR release."""


def debian_files(root: Path = Path("/")) -> dict[str, Path]:
    """The files read (PACKAGE_FILES) under ``root``, or EmojiDataError naming every missing package and
    the install line, before any work."""
    paths = {kind: root / path for kind, (_, path) in PACKAGE_FILES.items()}
    missing = sorted({PACKAGE_FILES[kind][0] for kind, path in paths.items() if not path.is_file()})
    if missing:
        files = ", ".join(str(path) for path in paths.values() if not path.is_file())
        raise EmojiDataError(f"the emoji data set needs the Debian package(s) {', '.join(missing)} ({files} not "
                             f"found); install them with `{INSTALL}`")
    return paths


def read_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of emoji-test.txt (``CODE POINTS ; STATUS # EMOJI E<version> NAME`` under
    ``# group:`` and ``# subgroup:`` headers), in its order (CLDR's), the EXCLUDED_GROUP left out."""
    emojis, group, subgroup = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            code_points, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            if status.strip() != "fully-qualified" or group == EXCLUDED_GROUP:
                continue
            fields = comment.split(maxsplit=2)
            if group is None or subgroup is None or len(fields) < 3:
                raise EmojiDataError(f"emoji-test.txt line {number} is not 'CODE POINTS ; STATUS # EMOJI "
                                     f"E<version> NAME' under a group and subgroup: {line!r}; reinstall it with "
                                     f"`{INSTALL}`")
            emojis.append(Emoji("".join(chr(int(cp, 16)) for cp in code_points.split()), fields[2], group, subgroup))
    return emojis


def read_annotations(xml: str) -> dict[str, tuple[str, ...]]:
    """CLDR annotation keywords by code point sequence (without U+FE0F): the ``<annotation cp="...">`` without
    ``type="tts"``, whose text lists them separated by ``|``."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise EmojiDataError(f"a CLDR annotations file is not XML ({exc}); reinstall it with `{INSTALL}`") from exc
    return {node.get("cp"): tuple(word.strip() for word in (node.text or "").split("|") if word.strip())
            for node in root.iter("annotation") if node.get("type") != "tts"}


def with_keywords(emojis: list[Emoji], *annotations: dict[str, tuple[str, ...]]) -> list[Emoji]:
    """``emojis`` with their keywords from the first of ``annotations`` that has them."""
    def keywords(emoji: Emoji) -> tuple[str, ...]:
        key = emoji.text.replace(VARIATION_SELECTOR, "")
        return next((table[key] for table in annotations if key in table), ())

    return [replace(emoji, keywords=keywords(emoji)) for emoji in emojis]


def caption(emoji: Emoji) -> str:
    """CAPTION_TEMPLATE filled: keywords equal to the name or to one of its parts (between ': ' and ', ') are
    left out, as they would only repeat it."""
    parts = {emoji.name.lower()} | {part.strip().lower() for part in emoji.name.replace(": ", ", ").split(", ")}
    keywords = [word for word in emoji.keywords if word.lower() not in parts]
    return CAPTION_TEMPLATE.format(name=emoji.name, keywords=", ".join(keywords)) if keywords else emoji.name


def emoji_font(path: Path) -> ImageFont.FreeTypeFont:
    """The font at its one strike, laid out by libraqm: only a shaping engine joins a sequence (a ZWJ
    family, a flag's two regional indicators) into its one glyph."""
    if not features.check("raqm"):
        raise EmojiDataError("this Pillow has no libraqm, so emoji sequences would be drawn as their separate "
                             "parts; install libraqm (`apt-get install -y libraqm0`) and reinstall Pillow")
    try:
        return ImageFont.truetype(str(path), GLYPH_SIZE, layout_engine=ImageFont.Layout.RAQM)
    except OSError as exc:
        raise EmojiDataError(f"{path} cannot be read as a font ({exc}); reinstall it with `{INSTALL}`") from exc


def render(text: str, font: ImageFont.FreeTypeFont, size: int = IMAGE_SIZE) -> np.ndarray | None:
    """``text`` drawn in colour on white, centred in a square, downscaled to ``size``: uint8 (size, size, 3);
    None where the font has no single glyph for it (drawn as several glyphs, or nothing drawn)."""
    one_glyph = font.getlength("\U0001f600")
    if font.getlength(text) > one_glyph:
        return None
    left, top, right, bottom = font.getbbox(text)
    glyph = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(glyph).text((-left, -top), text, font=font, embedded_color=True)
    if glyph.getbbox() is None:
        return None
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


def distinct(emojis: list[Emoji], images: np.ndarray) -> list[int]:
    """Indices of the emoji kept, in order: of those drawn identically, the one with the shortest name (the
    first of equal lengths)."""
    kept: dict[bytes, int] = {}
    for i, (emoji, image) in enumerate(zip(emojis, images)):
        other = kept.setdefault(image.tobytes(), i)
        if len(emoji.name) < len(emojis[other].name):
            kept[image.tobytes()] = i
    return sorted(kept.values())


def stratified_split(labels: np.ndarray, holdout_fraction: float, seed: int, split: str) -> np.ndarray:
    """Sorted indices of the ``train`` or ``heldout`` split: of each label's n samples, round(fraction * n)
    drawn by ``seed`` are held out, but at least one and never all, so that every label of two samples or
    more is in both splits (a label's only sample trains)."""
    if not 0 < holdout_fraction < 1:
        raise EmojiDataError(f"--holdout-fraction={holdout_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        heldout[members[:min(max(round(holdout_fraction * len(members)), 1), len(members) - 1)]] = True
    return np.flatnonzero(heldout if split == "heldout" else ~heldout)


@dataclass(frozen=True)
class EmojiSet:
    """Every distinct emoji pair, before the split: images, the emoji, their group ids and the group names."""

    images: np.ndarray
    emojis: list[Emoji]
    labels: np.ndarray
    groups: list[str]


def emoji_set(root: Path = Path("/"), size: int = IMAGE_SIZE) -> EmojiSet:
    """Read, draw and de-duplicate every fully-qualified emoji from the Debian files under ``root``."""
    paths = debian_files(root)
    font = emoji_font(paths["font"])
    emojis = with_keywords(read_emoji_test(paths["emoji_test"].read_text(encoding="utf-8")),
                           read_annotations(paths["annotations"].read_text(encoding="utf-8")),
                           read_annotations(paths["derived"].read_text(encoding="utf-8")))
    drawn = [(emoji, image) for emoji in emojis if (image := render(emoji.text, font, size)) is not None]
    if not drawn:
        raise EmojiDataError(f"{paths['font']} drew none of the emoji of {paths['emoji_test']}; reinstall them "
                             f"with `{INSTALL}`")
    emojis, images = [emoji for emoji, _ in drawn], np.stack([image for _, image in drawn])
    kept = distinct(emojis, images)
    groups = list(dict.fromkeys(emoji.group for emoji in emojis))
    return EmojiSet(images[kept], [emojis[i] for i in kept],
                    np.array([groups.index(emojis[i].group) for i in kept], dtype=np.int64), groups)


def emoji_source(split: str, holdout_fraction: float, split_seed: int, root: Path = Path("/")) -> Source:
    """The ``train`` or ``heldout`` split as a caption Source for dist_cl.data.shard_writer.make_shards:
    PNG images, the group id as label, the caption as .txt and the emoji's CLDR data as .json."""
    data = emoji_set(root)
    rows = stratified_split(data.labels, holdout_fraction, split_seed, split)
    source = array_source(data.images[rows], data.labels[rows], data.groups)

    def captions(i: int) -> dict[str, bytes]:
        emoji = data.emojis[rows[i]]
        meta = {"emoji": emoji.text, "code_points": " ".join(f"{ord(c):04X}" for c in emoji.text),
                "name": emoji.name, "keywords": list(emoji.keywords), "group": emoji.group,
                "subgroup": emoji.subgroup}
        return {"txt": caption(emoji).encode(), "json": json.dumps(meta, ensure_ascii=False).encode()}

    return replace(source, captions=captions)
