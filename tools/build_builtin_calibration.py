"""Build crossblock's built-in calibration set (src/crossblock/data/builtin/*.txt.xz) from sources
whose licenses allow redistribution. Run once by a maintainer, on Debian 12 (bookworm), as root:

    apt-get install -y bible-kjv            # the `bible` program that reads the KJV text
    cd /tmp/cal && apt-get download debian-reference-en debian-reference-de debian-reference-fr \
        debian-reference-es debian-reference-ja python3.11-doc
    python3 tools/build_builtin_calibration.py /tmp/cal $CROSSBLOCK_SHARED

The output is deterministic for the same package versions (listed in SOURCES.md, which this script
writes too). Every domain is cut to about BUDGET characters, whole paragraphs or files at a time.
"""
from __future__ import annotations

import html.parser
import lzma
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "crossblock" / "data" / "builtin"
BUDGET = 1_200_000  # characters per domain (~300K English tokens): with the mix's weights
                    # (data/builtin/__init__.py) every domain holds its share of 512 x 2048 tokens


class HtmlText(html.parser.HTMLParser):
    """The visible text of an HTML page, one paragraph per block element."""
    BLOCKS = {"p", "div", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd", "title", "br"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip, self.pre = [], 0, 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        self.pre += tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")
        self.pre -= tag == "pre"

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else data.replace("\n", " "))

    def text(self) -> str:
        paragraphs = [re.sub(r"[ \t\r\f\v]+", " ", p).strip() for p in "".join(self.parts).split("\n\n")]
        return "\n\n".join(p for p in paragraphs if len(p) > 40)


def html_text(path: Path) -> str:
    parser = HtmlText()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.text()


def take(pieces, budget=BUDGET) -> str:
    """Whole pieces, in order, until the budget is reached."""
    out, size = [], 0
    for piece in pieces:
        if size >= budget:
            break
        out.append(piece)
        size += len(piece) + 2
    return "\n\n".join(out)


def unpack(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def wikitext(shared: Path) -> str:
    """WikiText-2's validation split (never its test split, which is what the benchmarks score),
    detokenized. Its rare words were replaced by <unk> (about 2.6% of words): those are dropped, since
    a paragraph without them keeps its statistics, and two thirds of the paragraphs hold one."""
    raw = (shared / "data" / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    pieces = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"<unk> ?", "", line)
        if line.startswith("= ") and line.endswith(" ="):  # a heading: = Title =, = = Section = =
            line = line.strip("= ")
        line = re.sub(r" @(.)@ ", r"\1", line)
        line = re.sub(r" ([.,;:!?)'])", r"\1", line).replace("( ", "(").replace(" n't", "n't")
        pieces.append(line)
    return take(pieces)  # all of it: ~1.05M characters


NARRATIVE_BOOKS = ["Genesis", "Exodus", "Ruth", "1Samuel", "2Samuel", "1Kings", "2Kings", "Esther",
                   "Jonah", "Matthew", "Luke", "John", "Acts"]


def kjv() -> str:
    """The narrative books of the King James Version, a chapter per paragraph."""
    pieces = []
    for book in NARRATIVE_BOOKS:
        for chapter in range(1, 151):
            lines = subprocess.run(["bible", "-f", f"{book} {chapter}:1-200"], capture_output=True, text=True,
                                   check=True).stdout.splitlines()
            refs = [re.match(r"\S*?(\d+):(\d+) (.*)", v) for v in lines if v.strip()]
            if not refs or int(refs[0].group(1)) != chapter:  # past the last chapter: bible repeats it
                break
            pieces.append(" ".join(r.group(3).strip() for r in refs))
    return take(pieces)


def python_docs(debs: Path, work: Path) -> str:
    """The Python 3.11 tutorial, HOWTOs and FAQ (reStructuredText sources) and Debian Reference (English)."""
    doc = unpack(next(debs.glob("python3.11-doc_*.deb")), work / "pydoc") / "usr/share/doc/python3.11/html/_sources"
    files = [f for part in ("tutorial", "howto", "faq") for f in sorted((doc / part).glob("*.rst.txt"))]
    pieces = [f.read_text(encoding="utf-8") for f in files]
    ref = unpack(next(debs.glob("debian-reference-en_*.deb")), work / "ref-en") / "usr/share/debian-reference"
    pieces += [html_text(f) for f in sorted(ref.glob("ch*.en.html"))]
    return take(pieces)


def python_code() -> str:
    """Python's standard library sources (top-level modules, sorted), as this interpreter ships them."""
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    files = sorted(f for f in stdlib.glob("*.py") if not f.name.startswith("_"))
    return take(f.read_text(encoding="utf-8") for f in files)


def debian_reference(debs: Path, work: Path, langs=("de", "fr", "es", "ja")) -> str:
    """Debian Reference in four translations, 200K characters each."""
    per_lang = []
    for lang in langs:
        ref = unpack(next(debs.glob(f"debian-reference-{lang}_*.deb")), work / f"ref-{lang}") / "usr/share/debian-reference"
        per_lang.append(take([html_text(f) for f in sorted(ref.glob(f"ch*.{lang}.html"))], 200_000))
    return "\n\n".join(per_lang)


def main(debs: str, shared: str):
    debs, shared = Path(debs), Path(shared)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        domains = {"encyclopedic": wikitext(shared), "narrative": kjv(), "instructions": python_docs(debs, work),
                   "code": python_code(), "multilingual": debian_reference(debs, work)}
    for name, text in domains.items():
        data = lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
        (OUT / f"{name}.txt.xz").write_bytes(data)
        print(f"{name}: {len(text):,} chars, {len(data):,} bytes compressed")


if __name__ == "__main__":
    main(*sys.argv[1:3])
