"""What a text is written in, for everything that lays text out or measures it."""

from __future__ import annotations

import re

# Characters of scripts written without spaces between words (Chinese, Japanese,
# Korean), their punctuation and full-width forms: they wrap per character.
CJK = re.compile(
    "[\u2e80-\u2fdf\u3000-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]"
)


def has_cjk(text: str) -> bool:
    return CJK.search(text) is not None
