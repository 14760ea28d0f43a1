"""Near-duplicate entries and test-set leaks, the book's way (ch07/02_dataset-utilities,
find-near-duplicates.py): each text is lowercased, stripped of punctuation and turned into a
TF-IDF vector over its character 1- to 3-grams (what scikit-learn's
TfidfVectorizer(analyzer="char", ngram_range=(1, 3)) makes, fitted on the field's non-empty
texts); two texts are near-duplicates when the cosine similarity of their vectors is above a
threshold, 0.9 by default. An entry is a near-duplicate of another when each of its fields is
(equal texts, an empty one included, count as near-duplicates).

It scales where the book's n x n matrix cannot: each vector is also summarised by the norms of
its parts over a few hundred groups of features, and the dot product of two such summaries is at
least the cosine similarity of the vectors (Cauchy-Schwarz within each group). One matrix product
of the summaries, a block of rows at a time, rules out almost every pair; the similarity of the
rest is computed exactly. Nothing is approximated: the pairs found are all the pairs above the
threshold. numpy and torch only.
"""
import re
from dataclasses import dataclass

import numpy as np
import torch

THRESHOLD = 0.9  # the book's default
ALPACA_FIELDS, CONVERSATION_FIELDS = ("instruction", "input", "output"), ("system", "user", "assistant")
BLOCK_CELLS = 1 << 24  # similarity bounds computed at once: a block of rows times all columns (64 MiB)
ROUNDING = 1e-4  # float32 bounds may fall short of the exact bound by far less than this

PUNCTUATION = re.compile(r"[^\w\s]")  # the book's preprocess_text
WHITESPACE = re.compile(r"\s\s+")  # scikit-learn's char analyzer: runs of whitespace become one space


# ----------------------------------------------------------------------------- texts


def default_fields(entries):
    """The fields compared by default: an Alpaca entry's, or a conversation's turns by role."""
    return CONVERSATION_FIELDS if entries and "messages" in entries[0] else ALPACA_FIELDS


def field_texts(entries, field):
    """The text of `field` in each entry: an Alpaca entry's string (absent: ""), or for a
    conversation its turns of that role (system, user or assistant), joined by newlines."""
    texts = []
    for i, entry in enumerate(entries):
        if "messages" in entry:
            if field not in CONVERSATION_FIELDS:
                raise ValueError(f"entry {i} is a conversation: its fields are {', '.join(CONVERSATION_FIELDS)}, "
                                 f"not {field!r}")
            text = "\n".join(m["content"] for m in entry["messages"] if m["role"] == field)
        else:
            text = entry.get(field, "")
            if not isinstance(text, str):
                raise ValueError(f"entry {i}: {field!r} is not text, so it cannot be compared")
        texts.append(text)
    return texts


def preprocess(text):
    """What the book's script and scikit-learn's char analyzer make of a text before its n-grams."""
    return WHITESPACE.sub(" ", PUNCTUATION.sub("", text.lower()))


# ----------------------------------------------------------------------------- vectors


@dataclass
class Vectors:
    """TF-IDF vectors of texts as a CSR matrix (rows sorted by column, columns numbered from the
    most frequent n-gram), and each row's group norms (the bound's summary)."""
    indptr: np.ndarray
    cols: np.ndarray
    vals: np.ndarray  # float32, each row of norm 1 (or empty)
    n_cols: int
    groups: torch.Tensor  # (rows, G) float32: the norm of each row over columns c with c % G == g


def dense_ids(keys, size):
    """Each key as its rank among the distinct keys (0, 1, ...) in int32, and how many there are."""
    if size <= 2 * len(keys) + (1 << 20):  # a table: linear time
        present = np.zeros(size, dtype=bool)
        present[keys] = True
        return (np.cumsum(present, dtype=np.int32) - 1)[keys], int(present.sum())
    distinct, ids = np.unique(keys, return_inverse=True)
    return ids.astype(np.int32), len(distinct)


def ngram_ids(text):
    """The ids of the 1-, 2- and 3-grams (the substrings) of text by where they start (one array
    per width, each width - 1 shorter than the text), and the number of ids."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, n_chars = dense_ids(codes, int(codes.max()) + 1)
    bigrams, n_bigrams = dense_ids(chars[:-1].astype(np.int64) * n_chars + chars[1:], n_chars * n_chars)
    trigrams, n_trigrams = dense_ids(bigrams[:-1].astype(np.int64) * n_chars + chars[2:], n_bigrams * n_chars)
    bigrams += n_chars
    trigrams += n_chars + n_bigrams
    return (chars, bigrams, trigrams), n_chars + n_bigrams + n_trigrams


def windows(ids, starts, first, last):
    """(text - first, n-gram id) of each n-gram of each width that lies within one of the texts
    first..last - 1, whose characters start at starts[first], ..."""
    lo, hi = starts[first], starts[last]
    lengths = np.diff(starts[first:last + 1])
    text = np.repeat(np.arange(last - first, dtype=np.int32), lengths)
    room = np.repeat(starts[first + 1:last + 1], lengths) - np.arange(lo, hi)  # characters to the text's end
    for width, w_ids in enumerate(ids, start=1):
        w_ids = w_ids[lo:hi]
        inside = room[:len(w_ids)] >= width
        yield text[:len(w_ids)][inside], w_ids[inside]


def tfidf(texts, group_count=None, chunk=1 << 21):
    """The TF-IDF vectors of texts, as scikit-learn's char 1-3-gram TfidfVectorizer computes them
    on the book's preprocessed texts: counts times idf = ln((1 + n) / (1 + df)) + 1, n being the
    number of non-empty texts (an empty one is left out of the fit, as in the book, and gets an
    empty row), rows scaled to norm 1. Texts of about `chunk` characters are counted at a time."""
    docs = [preprocess(t) for t in texts]
    starts = np.r_[0, np.cumsum([len(d) for d in docs], dtype=np.int64)]
    ids, n_ids = ngram_ids("".join(docs)) if starts[-1] else ((), 0)
    # spans of texts counted together: each starts at the text that holds a multiple of `chunk`
    cuts = np.unique(np.r_[np.searchsorted(starts, np.arange(0, starts[-1], chunk), side="right") - 1, len(docs)])
    spans = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    # columns by collection frequency, most frequent first, so that column % G spreads the
    # frequent n-grams over all groups
    frequency = np.zeros(n_ids, dtype=np.int64)
    for first, last in spans:
        for _, w_ids in windows(ids, starts, first, last):
            frequency += np.bincount(w_ids, minlength=n_ids)
    column = np.empty(n_ids, dtype=np.int64)
    column[np.argsort(-frequency, kind="stable")] = np.arange(n_ids)
    n_cols = max(int((frequency > 0).sum()), 1)
    counted = []  # (text - first, column, count) of each chunk's distinct n-grams, sorted by text and column
    for first, last in spans:
        keys = np.concatenate([text * n_cols + column[w_ids] for text, w_ids in windows(ids, starts, first, last)])
        keys.sort()
        new = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        text, col = np.divmod(keys[new], n_cols)
        counted.append((text.astype(np.int32), col.astype(np.int32), np.diff(np.r_[new, len(keys)]).astype(np.int32)))
    del ids
    n_fitted = sum(bool(t) for t in texts)
    df = sum((np.bincount(col, minlength=n_cols) for _, col, _ in counted), np.zeros(n_cols, dtype=np.int64))
    idf = np.log((1 + n_fitted) / (1 + df)) + 1
    nnz = sum(len(col) for _, col, _ in counted)
    if group_count is None:  # measured: fewer groups than 2/3 of a text's n-grams let too many pairs through
        group_count = 32 * int(np.clip(np.ceil(nnz / max(n_fitted, 1) * 2 / 3 / 32), 2, 8))
    groups = torch.zeros(len(texts), group_count)
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    cols, vals = np.empty(nnz, dtype=np.int32), np.empty(nnz, dtype=np.float32)
    for k, (first, last) in enumerate(spans):
        text, col, count = counted[k]
        counted[k] = None  # freed as it is used
        lo = indptr[first]
        indptr[first + 1:last + 1] = lo + np.cumsum(np.bincount(text, minlength=last - first))
        weights = count * idf[col]
        weights /= np.sqrt(np.bincount(text, weights=weights * weights, minlength=last - first))[text]
        squares = np.bincount(text.astype(np.int64) * group_count + col % group_count, weights=weights * weights,
                              minlength=(last - first) * group_count)
        groups[first:last] = torch.from_numpy(np.sqrt(squares).reshape(last - first, group_count))
        cols[lo:lo + len(col)], vals[lo:lo + len(col)] = col, weights
    return Vectors(indptr, cols, vals, n_cols, groups)


# ----------------------------------------------------------------------------- similar pairs


def similarities(vectors, i, j, chunk=1 << 22):
    """The exact cosine similarity of rows i[k] and j[k] of the vectors, for each k (float64).
    Rows of i are made dense 256 at a time and each row of j is looked up in them."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out = np.zeros(len(i))
    order = np.argsort(i, kind="stable")
    distinct = np.unique(i)
    for start in range(0, len(distinct), 256):
        block = distinct[start:start + 256]
        dense = np.zeros((len(block), vectors.n_cols), dtype=np.float32)
        for r, row in enumerate(block):
            lo, hi = vectors.indptr[row], vectors.indptr[row + 1]
            dense[r, vectors.cols[lo:hi]] = vectors.vals[lo:hi]
        lo, hi = np.searchsorted(i[order], [block[0], block[-1] + 1])
        pairs = order[lo:hi]
        local = np.searchsorted(block, i[pairs])
        sizes = vectors.indptr[j[pairs] + 1] - vectors.indptr[j[pairs]]
        # a chunk of pairs at a time, so that their expanded entries stay below `chunk`
        ends = np.searchsorted(np.cumsum(sizes), np.arange(chunk, sizes.sum() + chunk, chunk), side="right")
        first = 0
        for last in np.unique(np.r_[ends, len(pairs)]):
            if last <= first:
                continue
            part, n = slice(first, last), sizes[first:last]
            pair_of = np.repeat(np.arange(last - first), n)
            entry = np.repeat(vectors.indptr[j[pairs[part]]] - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(n.sum())
            products = dense[local[part][pair_of], vectors.cols[entry]] * vectors.vals[entry]
            out[pairs[part]] = np.bincount(pair_of, weights=products, minlength=last - first)
            first = last
    return out


def near_pairs(vectors, threshold=THRESHOLD, left=None, right=None, allowed=None):
    """(i, j, similarity) of every pair of rows whose cosine similarity is above threshold: i < j
    among all rows, or with left and right (arrays of rows) i in left and j in right. allowed (a
    boolean per row) leaves the other rows out. Sorted by i, then j."""
    # rows without n-grams (or not allowed) have bounds of zero: leave them out of the product
    live = np.diff(vectors.indptr) > 0
    if allowed is not None:
        live &= allowed
    every = left is None
    if every:
        left = right = np.flatnonzero(live)
        bounds = columns = vectors.groups[torch.from_numpy(left)]
    else:
        left, right = (np.asarray(side, dtype=np.int64) for side in (left, right))
        left, right = left[live[left]], right[live[right]]
        bounds, columns = vectors.groups, vectors.groups[torch.from_numpy(right)]
    found_i, found_j = [], []
    rows_per_block = max(1, BLOCK_CELLS // max(len(right), 1))
    for start in range(0, len(left), rows_per_block):
        block = left[start:start + rows_per_block]
        if every:  # only the pairs i < j: the columns from the block's first row on
            hit = bounds[start:start + len(block)] @ columns[start:].T > threshold - ROUNDING
            hit[:, :len(block)].triu_(1)
        else:
            hit = bounds[torch.from_numpy(block)] @ columns.T > threshold - ROUNDING
        r, c = (t.numpy() for t in torch.nonzero(hit, as_tuple=True))
        found_i.append(block[r])
        found_j.append(right[c + start] if every else right[c])
    i = np.concatenate(found_i) if found_i else np.zeros(0, dtype=np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, dtype=np.int64)
    sims = similarities(vectors, i, j)
    keep = sims > threshold
    i, j, sims = i[keep], j[keep], sims[keep]
    order = np.lexsort((j, i))
    return i[order], j[order], sims[order]


def equal_texts(column):
    """The entries of each text that has n-grams, in order of first appearance: {text: [entries]}."""
    groups = {}
    for k, text in enumerate(column):
        groups.setdefault(text, []).append(k)
    return {text: members for text, members in groups.items() if preprocess(text)}


def count_field_pairs(column, grouped):
    """How many pairs of entries field_pairs would give, from what grouped_pairs gave (the pairs of
    distinct texts and each text's entries): without making them."""
    (i, j, _), groups = grouped
    sizes = np.array([len(groups.get(text, ())) for text in column], dtype=np.int64)  # blank texts: no pairs
    return int((sizes[i] * sizes[j]).sum()) + sum(len(g) * (len(g) - 1) // 2 for g in groups.values())


def grouped_pairs(vectors, column, threshold=THRESHOLD):
    """near_pairs of a field with each distinct text compared once (a field where thousands of
    entries share a text, a template, would otherwise give millions of pairs): (the near pairs of
    the first entries of distinct texts, {text: its entries})."""
    groups = equal_texts(column)
    first = np.zeros(len(column), dtype=bool)
    first[[members[0] for members in groups.values()]] = True
    return near_pairs(vectors, threshold, allowed=first), groups


def field_pairs(vectors, column, threshold=THRESHOLD, left=None, right=None, grouped=None):
    """near_pairs of a field's entries (i < j, or i in left and j in right), each distinct text
    compared once (grouped_pairs, or `grouped` as it gave them): every entry of a text with every
    entry of a near-duplicate one, and the entries of one text with each other. Sorted by i, then j."""
    (ni, nj, nsims), groups = grouped or grouped_pairs(vectors, column, threshold)
    pairs = [(a, b, sim) for x, y, sim in zip(ni.tolist(), nj.tolist(), nsims.tolist())
             for a in groups[column[x]] for b in groups[column[y]]]
    for members in groups.values():
        if len(members) > 1:
            same = float(similarities(vectors, np.array(members[:1]), np.array(members[:1]))[0])  # 1 but for rounding
            pairs += [(a, b, same) for x, a in enumerate(members) for b in members[x + 1:]]
    i, j, sims = (np.array(side, dtype=dtype) for side, dtype in
                  zip(zip(*pairs) if pairs else ([], [], []), (np.int64, np.int64, np.float64)))
    i, j = np.minimum(i, j), np.maximum(i, j)
    if left is not None:  # each pair the way round that has i in left and j in right
        in_left, in_right = (np.isin(np.arange(len(column)), side) for side in (left, right))
        forward, backward = in_left[i] & in_right[j], in_left[j] & in_right[i]
        i, j, sims = np.r_[i[forward], j[backward]], np.r_[j[forward], i[backward]], np.r_[sims[forward],
                                                                                              sims[backward]]
    order = np.lexsort((j, i))
    return i[order], j[order], sims[order]


def duplicate_entries(texts, threshold=THRESHOLD, left=None, right=None, vectors=None, pairs=None):
    """Pairs of entries whose every field is a near-duplicate, from texts {field: the field's text
    in each entry}: (i, j, {field: similarities}), a similarity being nan where the two texts are
    equal and have no n-grams (both empty, say). Pairs as near_pairs gives them (i < j, or i in
    left and j in right). The pairs of the field with the most distinct texts (the fewest pairs,
    as a rule: not a template's field) are found first and the other fields compared on those only.
    vectors ({field: tfidf}) and pairs ({field: field_pairs of all rows}) that the caller has
    already are used, not made again."""
    vectors = {**{field: None for field in texts}, **(vectors or {})}
    blank = {field: np.array([not preprocess(t) for t in column], dtype=bool) for field, column in texts.items()}
    first, *rest = sorted(texts, key=lambda f: (-len(set(texts[f])), blank[f].sum()))
    if pairs and first in pairs and left is None:
        i, j, found = pairs[first]
    else:
        vectors[first] = vectors[first] or tfidf(texts[first])
        i, j, found = field_pairs(vectors[first], texts[first], threshold, left, right)
    ei, ej = equal_blank_pairs(texts[first], blank[first], left, right)
    i, j, found = np.r_[i, ei], np.r_[j, ej], np.r_[found, np.full(len(ei), np.nan)]
    order = np.lexsort((j, i))
    i, j, sims = i[order], j[order], {first: found[order]}
    for field in rest:
        column = texts[field]
        same = np.array([column[a] == column[b] for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
        found = np.where(same & ~blank[field][i], 1.0, np.nan)
        compare = ~same & ~blank[field][i] & ~blank[field][j]
        if compare.any():
            vectors[field] = vectors[field] or tfidf(column)
            found[compare] = similarities(vectors[field], i[compare], j[compare])
        keep = same | (found > threshold)
        i, j, sims = i[keep], j[keep], {f: s[keep] for f, s in sims.items()}
        sims[field] = found[keep]
    return i, j, {field: sims[field] for field in texts}


def equal_blank_pairs(texts, blank, left=None, right=None):
    """(i, j) of equal texts without n-grams (empty, or punctuation only), which have no vector to
    compare: i < j, or i in left and j in right."""
    members = {}
    for k in np.flatnonzero(blank).tolist():
        members.setdefault(texts[k], []).append(k)
    if left is None:
        pairs = [(a, b) for group in members.values() for x, a in enumerate(group) for b in group[x + 1:]]
    else:
        in_left, in_right = set(np.asarray(left).tolist()), set(np.asarray(right).tolist())
        pairs = [(a, b) for group in members.values() for a in group if a in in_left for b in group if b in in_right]
    i, j = (np.array(side, dtype=np.int64) for side in zip(*pairs)) if pairs else (np.zeros(0, dtype=np.int64),) * 2
    return i, j


def keep_first(n, i, j):
    """Which of n entries to keep so that no two kept ones are near-duplicates: each entry in
    order, unless an entry kept before it is its near-duplicate (pairs i < j)."""
    earlier = [[] for _ in range(n)]
    for a, b in zip(i.tolist(), j.tolist()):
        earlier[b].append(a)
    kept = np.ones(n, dtype=bool)
    for b in range(n):
        kept[b] = not any(kept[a] for a in earlier[b])
    return kept


# ----------------------------------------------------------------------------- leaks between the splits


def leak_summary(train, test, val, threshold=THRESHOLD):
    """One line for the data summary: how many test and validation entries have a near-duplicate
    in train (every field a near-duplicate)."""
    entries = list(train) + list(test) + list(val)
    fields = default_fields(entries)
    texts = {field: field_texts(entries, field) for field in fields}
    others = np.arange(len(train), len(entries))
    leaked = np.unique(duplicate_entries(texts, threshold, others, np.arange(len(train)))[0]) if len(others) else []
    in_test = int((np.asarray(leaked) < len(train) + len(test)).sum())
    return (f"test-set leaks, entries with a near-duplicate in train (datatools.py dedup lists them): "
            f"{in_test} of {len(test)} test, {len(leaked) - in_test} of {len(val)} val")
