"""dedup.py: the book's TF-IDF vectors and similarities (against scikit-learn when it is
installed), the bound that rules pairs out (never one above the threshold), near-duplicate
entries, what --drop-duplicates keeps, and test-set leaks between the splits."""
import importlib.util
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

import dedup

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None

# texts with what the preprocessing must get right: case, punctuation, runs of whitespace (which
# become one space), a lone newline (kept), non-ASCII letters, digits, an empty text, one of
# punctuation only, one character
TEXTS = [
    "What is the capital of Italy?", "What's the capital city of Italy?", "The capital of Italy is Rome.",
    "The capital city is Rome.", "Identify the main verb in the sentence: 'The cat sleeps on the couch.'",
    "Identify the verb in the following sentence: The cat sleeps on the couch.", "Naïve café — crème brûlée!",
    "naive cafe creme brulee", "Tab\there,   spaces   and\nnewline", "tab here spaces and newline", "",
    "!!!", "x", "X", "Count: 1, 2, 3, 4, 5.", "count 1 2 3 4 5", "Über straße 12", "uber strasse 12",
]


def all_pairs(texts):
    """Every similarity, the slow way: each pair computed exactly."""
    vectors = dedup.tfidf(texts)
    i, j = np.triu_indices(len(texts), 1)
    return i, j, dedup.similarities(vectors, i, j)


def shared_data(name):
    """A data set in ../shared/data, or the test is skipped."""
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"../shared/data/{name} is not there")
    with open(path) as f:
        return json.load(f)


def as_the_book_lists(texts, threshold=0.9):
    """near_pairs as the book's script lists them: a text of one character or none is never paired."""
    return dedup.near_pairs(dedup.tfidf(texts), threshold, allowed=np.array([len(t) > 1 for t in texts]))


def book_pairs(texts, threshold):
    """The book's find_near_duplicates on one field, with its indices kept right: every pair above
    the threshold, except pairs with a text of one character or none."""
    i, j, sims = all_pairs(texts)
    keep = (sims > threshold) & np.array([len(texts[a]) > 1 and len(texts[b]) > 1 for a, b in zip(i, j)])
    return i[keep], j[keep], sims[keep]


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed (it is no dependency)")
def test_vectors_and_similarities_are_scikit_learns_on_the_books_preprocessing():
    from sklearn.feature_extraction.text import TfidfVectorizer

    def preprocess_text(text):  # the book's, word for word
        text = text.lower()
        text = re.sub(r"[^\w\s]", "", text)
        return text

    fitted = [t for t in TEXTS if t]  # the book fits on the non-empty texts
    reference = TfidfVectorizer(stop_words=None, analyzer="char", ngram_range=(1, 3)).fit_transform(
        [preprocess_text(t) for t in fitted])
    expected = (reference @ reference.T).toarray()
    vectors = dedup.tfidf(TEXTS)
    rows = [k for k, t in enumerate(TEXTS) if t]
    i, j = (np.array(a) for a in zip(*itertools.product(range(len(rows)), repeat=2)))
    got = dedup.similarities(vectors, np.array(rows)[i], np.array(rows)[j])
    assert np.abs(got - expected[i, j]).max() < 1e-6
    # the n-gram counts too: as many distinct n-grams per text, the same idf weights
    assert np.diff(vectors.indptr)[rows].tolist() == np.diff(reference.indptr).tolist()
    assert vectors.n_cols == reference.shape[1]


def test_similarities_by_hand():
    vectors = dedup.tfidf(["ab", "ab!", "AB", "ba", ""])
    # four texts fitted ("" is left out); "ab", "ab!" and "AB" are the same text once preprocessed
    assert dedup.similarities(vectors, [0, 0, 0], [1, 2, 4]) == pytest.approx([1, 1, 0])
    # "ab" and "ba" share a and b (df 4 each, idf 1 + ln(5/5) = 1) but not "ab" (df 3) or "ba" (df 1)
    idf_ab, idf_ba = 1 + np.log(5 / 4), 1 + np.log(5 / 2)
    expected = 2 / np.sqrt(2 + idf_ab ** 2) / np.sqrt(2 + idf_ba ** 2)
    assert dedup.similarities(vectors, [0], [3])[0] == pytest.approx(expected, rel=1e-6)


def test_the_group_bound_is_never_below_the_similarity():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "capital", "river", "stone"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(60)] + TEXTS
    i, j, sims = all_pairs(texts)
    for groups in (1, 3, 64):
        bounds = dedup.tfidf(texts, group_count=groups).groups
        assert ((bounds[i] * bounds[j]).sum(1).numpy() >= sims - 1e-6).all()


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("groups", [1, 4, None])  # 1: every pair is a candidate; None: the default
def test_near_pairs_are_every_pair_above_the_threshold(threshold, groups, monkeypatch):
    monkeypatch.setattr(dedup, "BLOCK_CELLS", 50)  # many blocks of rows
    texts = TEXTS * 2
    vectors = dedup.tfidf(texts, group_count=groups)
    i, j, sims = dedup.near_pairs(vectors, threshold)
    ei, ej, esims = all_pairs(texts)
    keep = esims > threshold
    assert list(zip(i, j)) == list(zip(ei[keep], ej[keep]))
    assert sims == pytest.approx(esims[keep])
    # across two sets of rows: the same pairs, seen from the left set
    left, right = np.arange(0, len(texts), 2), np.arange(1, len(texts), 2)
    ci, cj, csims = dedup.near_pairs(vectors, threshold, left, right)
    expected = sorted((a, b) for a in left for b in right
                      if dedup.similarities(vectors, [a], [b])[0] > threshold)
    assert list(zip(ci, cj)) == expected


def test_the_books_pairs_on_its_example_data_set():
    """The book's README: find-near-duplicates.py on instruction-examples.json (LLMs-from-scratch,
    ch07/02_dataset-utilities) finds these."""
    entries = shared_data("instruction-examples.json")
    found = {}
    for field in dedup.ALPACA_FIELDS:
        texts = dedup.field_texts(entries, field)
        i, j, sims = as_the_book_lists(texts)
        found[field] = [(texts[a], texts[b], round(s, 2)) for a, b, s in zip(i, j, sims)]
    assert found == {
        "instruction": [
            ("Edit the following sentence to make it more formal.", "Edit the sentence to make it more formal.", 0.94),
            ("Name a dwarf planet in our solar system.", "Name a dwarf planet in our solar system.", 1.0),
            ("Change the sentences from active voice to passive voice.",
             "Change the sentence from passive to active voice.", 0.91)],
        "input": [],
        "output": [("One dwarf planet in our solar system is Pluto.",
                    "One dwarf planet in our solar system is Pluto.", 1.0)]}


def test_the_chapters_data_set_against_the_books_way():
    entries = shared_data("instruction-data.json")
    for field in dedup.ALPACA_FIELDS:
        texts = dedup.field_texts(entries, field)
        i, j, sims = as_the_book_lists(texts)
        bi, bj, bsims = book_pairs(texts, 0.9)
        assert list(zip(i, j)) == list(zip(bi, bj)) and sims == pytest.approx(bsims)
        assert len(i) == {"instruction": 441, "input": 15, "output": 1}[field]
    assert dedup.leak_summary(entries[:935], entries[935:1045], entries[1045:]).endswith(
        ": 0 of 110 test, 0 of 55 val")


# ----------------------------------------------------------------------------- entries


def entry(instruction, output, input=""):
    return {"instruction": instruction, "input": input, "output": output}


ENTRIES = [  # 2 is 0; 3 is near 0; 4 has 0's instruction, another output; 6 has 5's instruction, another input
    entry("Name a dwarf planet in our solar system.", "One dwarf planet in our solar system is Pluto."),
    entry("What is the capital of Italy?", "The capital of Italy is Rome."),
    entry("Name a dwarf planet in our solar system.", "One dwarf planet in our solar system is Pluto."),
    entry("Name one dwarf planet in our solar system.", "One dwarf planet in the solar system is Pluto."),
    entry("Name a dwarf planet in our solar system.", "Ceres, in the asteroid belt."),
    entry("Translate to French.", "Bonjour", "Hello"),
    entry("Translate to French.", "Merci", "Thank you"),
    entry("What is the capital of Italy?", "The capital of Italy is Rome."),  # 7 is 1
]


def test_entries_are_near_duplicates_when_every_field_is():
    texts = {field: dedup.field_texts(ENTRIES, field) for field in dedup.ALPACA_FIELDS}
    i, j, sims = dedup.duplicate_entries(texts)
    assert list(zip(i, j)) == [(0, 2), (0, 3), (1, 7), (2, 3)]
    assert np.isnan(sims["input"]).all()  # both empty: equal, with no similarity
    assert sims["instruction"][[0, 2]] == pytest.approx([1, 1]) and 0.9 < sims["instruction"][1] < 1
    assert 0.9 < sims["output"][1] < 1
    # what --drop-duplicates keeps: 2 and 3 have 0 before them, 7 has 1
    assert dedup.keep_first(len(ENTRIES), i, j).tolist() == [True, True, False, False, True, True, True, False]


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_field_pairs_compare_each_distinct_text_once_and_give_near_pairs_pairs(threshold):
    texts = TEXTS * 3 + ["", TEXTS[0]]  # equal texts in threes and fours, and a blank one
    vectors = dedup.tfidf(texts)
    expected = dedup.near_pairs(vectors, threshold)
    i, j, sims = dedup.field_pairs(vectors, texts, threshold)
    assert list(zip(i, j)) == list(zip(*expected[:2])) and sims == pytest.approx(expected[2])
    near, groups = dedup.grouped_pairs(vectors, texts, threshold)
    assert dedup.count_field_pairs(texts, (near, groups)) == len(i)
    assert len(groups) == len({t for t in TEXTS if dedup.preprocess(t)})  # "!!!" has no n-grams either
    left, right = np.arange(0, len(texts), 2), np.arange(1, len(texts), 2)
    expected = dedup.near_pairs(vectors, threshold, left, right)
    i, j, sims = dedup.field_pairs(vectors, texts, threshold, left, right)
    assert list(zip(i, j)) == list(zip(*expected[:2])) and sims == pytest.approx(expected[2])


def test_a_template_shared_by_every_entry_is_not_paired_entry_by_entry(monkeypatch):
    """A classification set: every entry has one instruction, so 1,000 entries give half a million
    pairs of instructions. The entries are paired from the field with the most distinct texts (the
    review); the instruction's pairs are never made: near_pairs sees each distinct text once."""
    reviews = [f"Review {n}: the {w} was {a}." for n, (w, a) in enumerate(
        (w, a) for w in ("film", "plot", "cast", "score", "ending") for a in ("dull", "great", "long"))]
    entries = [entry("Classify the sentiment of the review.", ("positive", "negative")[n % 2],
                     f"{reviews[n % 15]} #{n}") for n in range(1000)]
    texts = {field: dedup.field_texts(entries, field) for field in dedup.ALPACA_FIELDS}
    made = []  # the number of pairs of each field paired entry by entry
    field_pairs, near_pairs = dedup.field_pairs, dedup.near_pairs
    monkeypatch.setattr(dedup, "field_pairs", lambda *a, **k: made.append(len(field_pairs(*a, **k)[0])) or
                        field_pairs(*a, **k))
    i, j, sims = dedup.duplicate_entries(texts)
    assert len(made) == 1 and made[0] < 100  # one field's pairs made: the reviews' few
    ni, nj, _ = near_pairs(dedup.tfidf(texts["input"]))  # the reviews' near pairs with the same label
    expected = [(a, b) for a, b in zip(ni.tolist(), nj.tolist()) if a % 2 == b % 2]
    assert list(zip(i.tolist(), j.tolist())) == expected and len(expected) > 10
    vectors = dedup.tfidf(texts["instruction"])
    near, groups = dedup.grouped_pairs(vectors, texts["instruction"])
    assert len(near[0]) == 0 and list(groups) == ["Classify the sentiment of the review."]
    assert dedup.count_field_pairs(texts["instruction"], (near, groups)) == 1000 * 999 // 2


def test_keep_first_keeps_an_entry_whose_only_near_duplicate_went():
    # a ~ b and b ~ c, but a is not c: b goes, c stays (no two kept entries are near-duplicates)
    kept = dedup.keep_first(3, np.array([0, 1]), np.array([1, 2]))
    assert kept.tolist() == [True, False, True]


def test_a_planted_test_set_leak_and_its_summary():
    train = [entry(f"Write the number {n} in words.", f"The number is {w}.") for n, w in
             enumerate("zero one two three four five six seven eight nine".split())]
    test = [entry("Write number 3 in words.", "The number is three."),  # a leak of train 3
            entry("Name a color.", "Blue.")]
    val = [entry("Name a color.", "Blue."), entry("Write the number 7 in words.", "The number is seven.")]
    assert dedup.leak_summary(train, test, val) == (
        "test-set leaks, entries with a near-duplicate in train (datatools.py dedup lists them): "
        "1 of 2 test, 1 of 2 val")
    entries = train + test + val
    texts = {field: dedup.field_texts(entries, field) for field in dedup.ALPACA_FIELDS}
    i, j, sims = dedup.duplicate_entries(texts, left=np.arange(10, 14), right=np.arange(10))
    assert list(zip(i, j)) == [(10, 3), (13, 7)]
    assert 0.9 < sims["instruction"][0] < 1 and sims["output"][0] == pytest.approx(1)  # the same output
    assert sims["instruction"][1] == pytest.approx(1)


def test_conversations_compare_their_turns_by_role():
    def chat(user, answer, system=None):
        return {"messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    entries = [chat("Hi there!", "Hello! How can I help?"), chat("hi there", "Hello, how can I help?"),
               chat("Hi there!", "Hello! How can I help?", system="Be brief."), chat("Bye.", "Goodbye!")]
    assert dedup.default_fields(entries) == ("system", "user", "assistant")
    assert dedup.field_texts(entries, "system") == ["", "", "Be brief.", ""]
    texts = {field: dedup.field_texts(entries, field) for field in dedup.default_fields(entries)}
    i, j, _ = dedup.duplicate_entries(texts)
    assert list(zip(i, j)) == [(0, 1)]  # 2 has a system message the others lack
    with pytest.raises(ValueError, match="entry 0 is a conversation: its fields are system, user, assistant, not "
                                         "'instruction'"):
        dedup.field_texts(entries, "instruction")


def test_a_field_that_is_not_text_is_named():
    with pytest.raises(ValueError, match=r"entry 1: 'score' is not text"):
        dedup.field_texts([{"score": "high"}, {"score": 3}], "score")


def test_blocks_of_rows_do_not_change_the_pairs(monkeypatch):
    texts = TEXTS * 3
    expected = dedup.near_pairs(dedup.tfidf(texts))
    monkeypatch.setattr(dedup, "BLOCK_CELLS", 7)
    got = dedup.near_pairs(dedup.tfidf(texts, chunk=5))  # and the n-grams counted a few texts at a time
    assert all(np.array_equal(a, b) for a, b in zip(got[:2], expected[:2]))
    assert got[2] == pytest.approx(expected[2])
    assert torch.equal(dedup.tfidf(texts, chunk=5).groups, dedup.tfidf(texts).groups)
