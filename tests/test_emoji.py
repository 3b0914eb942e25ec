"""The emoji caption set (dist_cl.data.emoji) from files in the Debian packages' formats, written here: parsing,
the caption template, de-duplication, the stratified split, the named error when a package is missing, and
the shards the writer makes of it. The rendering test draws with a colour font written here, and with
Debian's where it is installed."""

import json
from pathlib import Path

import numpy as np
import pytest
from fontTools.colorLib.builder import buildCOLR, buildCPAL
from fontTools.feaLib.builder import addOpenTypeFeaturesFromString
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen

from dist_cl.config import AugmentConfig
from dist_cl.data import emoji as emoji_data
from dist_cl.data.captions import CaptionPairs
from dist_cl.data.emoji import (
    INSTALL,
    PACKAGE_FILES,
    Emoji,
    EmojiDataError,
    caption,
    debian_files,
    distinct,
    emoji_source,
    read_annotations,
    read_emoji_test,
    stratified_split,
    with_keywords,
)
from dist_cl.data.shard_writer import make_shards

EMOJI_TEST = """\
# emoji-test.txt
# Format: code points; status # emoji name

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
1F603                                                  ; fully-qualified     # 😃 E0.6 grinning face with big eyes

# subgroup: face-affection
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# Smileys & Emotion subtotal:		4

# group: People & Body

# subgroup: hand-fingers-closed
1F44D                                                  ; fully-qualified     # 👍 E0.6 thumbs up
1F44D 1F3FD                                            ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Animals & Nature

# subgroup: animal-mammal
1FACE                                                  ; fully-qualified     # 🫎 E15.0 moose

#EOF
"""

ANNOTATIONS = """\
<?xml version="1.0" encoding="UTF-8" ?>
<!DOCTYPE ldml SYSTEM "../../common/dtd/ldml.dtd">
<ldml>
	<identity>
		<version number="$Revision$"/>
		<language type="en"/>
	</identity>
	<annotations>
		<annotation cp="😀">face | grin | grinning face</annotation>
		<annotation cp="😀" type="tts">grinning face</annotation>
		<annotation cp="😃">face | grinning face with big eyes | mouth | open | smile</annotation>
		<annotation cp="😃" type="tts">grinning face with big eyes</annotation>
		<annotation cp="☺">face | outlined | relaxed | smile | smiling face</annotation>
		<annotation cp="☺" type="tts">smiling face</annotation>
		<annotation cp="👍">+1 | hand | thumb | thumbs up | up</annotation>
		<annotation cp="👍" type="tts">thumbs up</annotation>
	</annotations>
</ldml>
"""

DERIVED = ANNOTATIONS.replace("""		<annotation cp="😀">face | grin | grinning face</annotation>
		<annotation cp="😀" type="tts">grinning face</annotation>
""", """		<annotation cp="👍🏽">+1 | hand | medium skin tone | thumb | thumbs up | up</annotation>
		<annotation cp="👍🏽" type="tts">thumbs up: medium skin tone</annotation>
		<annotation cp="😀">derived keywords never win</annotation>
""")


def debian_root(tmp_path: Path) -> Path:
    """A file system root holding the four files in the packages' formats (a font file that is no font)."""
    files = {"font": b"not a font", "annotations": ANNOTATIONS.encode(), "derived": DERIVED.encode(),
             "emoji_test": EMOJI_TEST.encode()}
    for kind, (_, path) in PACKAGE_FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(files[kind])
    return tmp_path


def test_emoji_test_parsing_keeps_fully_qualified_emoji_with_group_and_subgroup_in_file_order():
    emojis = read_emoji_test(EMOJI_TEST)
    assert [(e.text, e.name, e.group, e.subgroup) for e in emojis] == [
        ("\U0001f600", "grinning face", "Smileys & Emotion", "face-smiling"),
        ("\U0001f603", "grinning face with big eyes", "Smileys & Emotion", "face-smiling"),
        ("\u263a\ufe0f", "smiling face", "Smileys & Emotion", "face-affection"),
        ("\U0001f44d", "thumbs up", "People & Body", "hand-fingers-closed"),
        ("\U0001f44d\U0001f3fd", "thumbs up: medium skin tone", "People & Body", "hand-fingers-closed"),
        ("\U0001face", "moose", "Animals & Nature", "animal-mammal"),
    ]


def test_a_malformed_emoji_test_line_is_a_named_error():
    with pytest.raises(EmojiDataError, match="line 3 .* under a group and subgroup.*apt-get install"):
        read_emoji_test("# group: Smileys & Emotion\n# subgroup: face-smiling\n1F600 ; fully-qualified # 😀\n")


def test_annotations_give_keywords_by_code_point_and_leave_out_the_spoken_names():
    assert read_annotations(ANNOTATIONS)["\U0001f600"] == ("face", "grin", "grinning face")
    assert read_annotations(ANNOTATIONS)["\u263a"] == ("face", "outlined", "relaxed", "smile", "smiling face")
    with pytest.raises(EmojiDataError, match="not XML"):
        read_annotations("<ldml><annotations>")


def test_keywords_come_from_the_first_annotations_holding_the_emoji_without_its_variation_selector():
    emojis = with_keywords(read_emoji_test(EMOJI_TEST), read_annotations(ANNOTATIONS), read_annotations(DERIVED))
    keywords = {e.name: e.keywords for e in emojis}
    assert keywords["grinning face"] == ("face", "grin", "grinning face")
    assert keywords["smiling face"] == ("face", "outlined", "relaxed", "smile", "smiling face")
    assert keywords["thumbs up: medium skin tone"] == ("+1", "hand", "medium skin tone", "thumb", "thumbs up", "up")
    assert keywords["moose"] == ()  # newer than the CLDR release


@pytest.mark.parametrize("emoji,expected", [
    (Emoji("\U0001f600", "grinning face", "g", "s", ("face", "grin", "grinning face")), "grinning face (face, grin)"),
    (Emoji("\U0001f44d\U0001f3fd", "thumbs up: medium skin tone", "g", "s",
           ("+1", "hand", "medium skin tone", "thumb", "thumbs up", "up")),
     "thumbs up: medium skin tone (+1, hand, thumb, up)"),
    (Emoji("x", "family: man, man, boy", "g", "s", ("boy", "family", "Man")), "family: man, man, boy"),
    (Emoji("\U0001face", "moose", "g", "s"), "moose"),
])
def test_caption_is_the_name_then_the_keywords_that_do_not_repeat_it(emoji, expected):
    assert caption(emoji) == expected


def test_of_emoji_drawn_alike_only_the_shortest_name_is_kept():
    names = ["flag: Bouvet Island", "flag: Norway", "snowboarder", "flag: Svalbard & Jan Mayen", "snowboarder: dark"]
    emojis = [Emoji(str(i), name, "g", "s") for i, name in enumerate(names)]
    images = np.zeros((5, 2, 2, 3), np.uint8)
    images[[2, 4]] = 7
    assert distinct(emojis, images) == [1, 2]


def test_the_stratified_split_puts_every_group_of_two_or_more_in_both_splits_fixed_by_seed():
    labels = np.repeat(np.arange(5), [1, 2, 3, 10, 50])
    train, heldout = (stratified_split(labels, 0.2, 0, split) for split in ("train", "heldout"))
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(len(labels)))
    assert set(labels[train]) == {0, 1, 2, 3, 4} and set(labels[heldout]) == {1, 2, 3, 4}
    assert [int((labels[heldout] == k).sum()) for k in range(5)] == [0, 1, 1, 2, 10]
    assert np.array_equal(heldout, stratified_split(labels, 0.2, 0, "heldout"))
    assert not np.array_equal(heldout, stratified_split(labels, 0.2, 1, "heldout"))
    with pytest.raises(EmojiDataError, match="--holdout-fraction=1.0 must lie strictly between 0 and 1"):
        stratified_split(labels, 1.0, 0, "train")


def test_missing_packages_are_named_with_the_install_line_before_any_work(tmp_path):
    with pytest.raises(EmojiDataError) as missing:
        emoji_source("train", 0.2, 0, root=tmp_path)
    assert all(package in str(missing.value) for package, _ in PACKAGE_FILES.values())
    assert INSTALL in str(missing.value)
    root = debian_root(tmp_path)
    (root / PACKAGE_FILES["emoji_test"][1]).unlink()
    with pytest.raises(EmojiDataError, match=r"Debian package\(s\) unicode-data \(.*emoji-test.txt not found\)"):
        debian_files(root)


def fake_render(text: str, font, size: int) -> np.ndarray:
    """A flat colour per emoji, in place of the font."""
    return np.full((size, size, 3), sum(map(ord, text)) % 251, np.uint8)


def test_emoji_shards_hold_the_captions_group_labels_and_metadata(tmp_path, monkeypatch):
    root = debian_root(tmp_path / "debian")
    monkeypatch.setattr(emoji_data, "emoji_font", lambda path: None)
    monkeypatch.setattr(emoji_data, "render", fake_render)
    for split in ("train", "heldout"):
        make_shards(emoji_source(split, 0.4, 0, root=root), tmp_path / "emoji" / split, 2, {"split": split})
    train, heldout = (CaptionPairs(tmp_path / "emoji" / split, AugmentConfig(), 32, seed=0)
                      for split in ("train", "heldout"))
    captions = {pairs.caption(i): pairs.labels[i] for pairs in (train, heldout) for i in range(len(pairs))}
    assert captions == {"grinning face (face, grin)": 0, "grinning face with big eyes (face, mouth, open, smile)": 0,
                        "smiling face (face, outlined, relaxed, smile)": 0, "thumbs up (+1, hand, thumb, up)": 1,
                        "thumbs up: medium skin tone (+1, hand, thumb, up)": 1, "moose": 2}
    assert set(heldout.labels) == {0, 1}  # moose, alone in its group, trains
    view, tokens, index = heldout[0]
    assert view.shape == (3, 32, 32) and tokens.shape == (77,) and index == 0
    meta = json.loads(train._sample(0)[1][".json"].read())
    assert meta["group"] == "Smileys & Emotion" and meta["code_points"] == " ".join(
        f"{ord(c):04X}" for c in meta["emoji"])


FONT = Path("/") / PACKAGE_FILES["font"][1]


def write_colour_font(path: Path) -> Path:
    """A colour font with what the rendering test draws, as ligatures the shaper makes, as in Noto Color Emoji: a
    grinning face, a flag made of two regional indicators, and a ZWJ family made of three people. Its colours
    are COLR layers over outlines where Noto's are CBDT bitmaps: FreeType draws both for ``embedded_color``."""
    def square(bottom: int = 0, top: int = 800):
        pen = TTGlyphPen(None)
        pen.moveTo((100, bottom))
        for corner in ((100, top), (900, top), (900, bottom)):
            pen.lineTo(corner)
        pen.closePath()
        return pen.glyph()

    characters = {0x1F600: "grin", 0x1F1FA: "letter_u", 0x1F1F8: "letter_s", 0x1F468: "man", 0x200D: "zwj",
                  0x1F469: "woman", 0x1F467: "girl"}
    glyphs = {".notdef": square(), **{name: square() for name in characters.values()}, "flag": square(),
              "flag_top": square(400, 800), "flag_bottom": square(0, 400), "family": square()}
    glyphs["zwj"] = TTGlyphPen(None).glyph()  # joins, draws nothing
    font = FontBuilder(1000, isTTF=True)
    font.setupGlyphOrder(list(glyphs))
    font.setupCharacterMap(characters)
    font.setupGlyf(glyphs)
    font.setupHorizontalMetrics({name: (0 if name == "zwj" else 1000, 100) for name in glyphs})
    font.setupHorizontalHeader(ascent=900, descent=-100)
    font.setupNameTable({"familyName": "dist_cl test emoji", "styleName": "Regular"})
    font.setupOS2()
    font.setupPost()
    addOpenTypeFeaturesFromString(font.font, "languagesystem DFLT dflt; feature ccmp { sub letter_u letter_s by flag; "
                                             "sub man zwj woman zwj girl by family; } ccmp;")
    font.font["CPAL"] = buildCPAL([[(1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0), (1.0, 0.8, 0.0, 1.0)]])
    font.font["COLR"] = buildCOLR({"flag": [("flag_top", 0), ("flag_bottom", 1)], "grin": [("grin", 2)],
                                   "family": [("family", 2)]})
    font.save(path)
    return path


@pytest.fixture(params=["written here", "Debian's"])
def font_file(request, tmp_path) -> Path:
    """The colour font written here (every run), and Noto Color Emoji where its package is installed."""
    if request.param == "written here":
        return write_colour_font(tmp_path / "colour.ttf")
    if not FONT.is_file():
        pytest.skip(f"Debian's font is not installed: {INSTALL}")
    return FONT


def test_the_font_draws_an_emoji_sequence_as_one_colour_glyph_and_refuses_what_it_lacks(font_file):
    font = emoji_data.emoji_font(font_file)
    flag = emoji_data.render("\U0001f1fa\U0001f1f8", font, 48)  # two regional indicators, one glyph
    assert flag.shape == (48, 48, 3) and (flag != 255).any()
    assert (np.ptp(flag.reshape(-1, 3).astype(int), axis=1) > 100).any()  # red and blue, not grey
    assert emoji_data.render("\U0001f468\u200d\U0001f469\u200d\U0001f467", font, 48) is not None  # a ZWJ family
    assert emoji_data.render("\U0001f600\U0001f600", font, 48) is None
