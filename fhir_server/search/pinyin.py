"""Pinyin search keys for Chinese names, so that staff can find 张三 by ``zhangsan`` or ``zs``.

Keys are toneless, lowercase and without spaces: the full reading, then the initials. The first
character of a name is usually the surname, whose reading often differs from the everyday one
(单 is "shan", 曾 is "zeng"), so its surname reading and its other readings give extra variants,
a few at most. pypinyin knows phrases (compound surnames such as 尉迟 and 单于 come out right) but
has no surname mode, hence the small table below.
"""

from __future__ import annotations

import re
from functools import lru_cache

# CJK unified ideographs: basic block, extension A, compatibility block, extensions B and later.
_CJK_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK = re.compile(f"[{_CJK_CLASS}]")
# A run of CJK characters, or a word of anything else (letters, digits); punctuation and spaces
# (including the middle dot of 阿沛·阿旺晋美) separate words and are dropped.
_RUNS = re.compile(f"([{_CJK_CLASS}]+)|([^\\W_{_CJK_CLASS}]+)")
MAX_VARIANTS = 4

# Single-character surnames whose surname reading is not pypinyin's everyday reading.
_SURNAME = {
    "单": "shan", "曾": "zeng", "区": "ou", "仇": "qiu", "解": "xie", "查": "zha", "朴": "piao",
    "翟": "zhai", "盖": "ge", "覃": "qin", "乐": "yue", "缪": "miao", "秘": "bi", "种": "chong",
    "召": "shao", "员": "yun", "折": "she", "繁": "po", "句": "gou", "祭": "zhai", "能": "nai",
    "隗": "wei", "薄": "bo", "藏": "zang", "长": "chang", "都": "du", "便": "pian"
}
# Compound surnames that start with a character of the table: pypinyin reads them right as phrases.
_COMPOUND = ("单于", "长孙")


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds at least one Chinese character."""
    return _CJK.search(text) is not None


@lru_cache(maxsize=16384)
def pinyin_keys(text: str) -> tuple[str, ...]:
    """Full readings then initials of ``text`` (a few variants for the first character); () when
    it has no Chinese character."""
    if not has_cjk(text):
        return ()
    # Imported on first use: its dictionaries cost ~60 MB and 0.4 s, wasted on non-Chinese data.
    from pypinyin import Style, lazy_pinyin, pinyin

    syllables: list[str] = []
    first_is_cjk = False
    for i, m in enumerate(_RUNS.finditer(text)):
        if m.group(1):
            first_is_cjk = first_is_cjk or i == 0
            syllables += [s.casefold() for s in lazy_pinyin(m.group(1), style=Style.NORMAL, errors="ignore") if s]
        else:
            syllables.append(m.group(2).casefold())
    if not syllables:
        return ()
    readings = [syllables[0]]
    if first_is_cjk:
        head = text.lstrip()[0]
        surname = _SURNAME.get(head) if not text.lstrip().startswith(_COMPOUND) else None
        others = pinyin(head, style=Style.NORMAL, heteronym=True, errors="ignore")
        readings = [r for r in ([surname] if surname else []) + readings + (others[0] if others else []) if r]
        readings = list(dict.fromkeys(readings))[:MAX_VARIANTS]
    rest = "".join(syllables[1:])
    rest_initials = "".join(s[0] for s in syllables[1:])
    full = [r + rest for r in readings]
    initials = [r[0] + rest_initials for r in readings]
    return tuple(dict.fromkeys(full + initials))
