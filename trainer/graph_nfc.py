"""Unicode NFC in plain TensorFlow ops, so the export's in-graph tokenizers see a prime as the
Python tokenizer does (`preprocessing.cleaning.normalize`): an NFD prime (as macOS input often
is) gets the same ids from babble, serve and the SavedModel.

Why written here: TensorFlow 2.21 has no normalisation op (`tf.strings.unicode_transcode` only
changes encodings; `normalize_utf8` is tensorflow-text's, which cannot join verne's environment,
see `trainer.graph_subword`), and a `tf.py_function` would not survive the SavedModel. So the
algorithm of Unicode's UAX #15 runs on tables taken from Python's own `unicodedata` when the
module is built, which makes the graph agree with the Python side character for character
(the same Unicode version): canonical decomposition (one table lookup per character, the full
decomposition precomputed), canonical ordering (a stable sort of each run of combining marks by
combining class), then canonical composition. Composition is sequential only inside a
"segment" (a starter that nothing composes into, and what follows it up to the next one), so
it runs as one vectorised step per position within a segment across all segments at once:
as many steps as the longest segment (a few for real text). Hangul syllables compose by
arithmetic, as in the standard. Text whose characters can neither decompose, reorder nor
compose (most text) is returned as it came after one lookup per character.
"""

from __future__ import annotations

import functools
import unicodedata

import tensorflow as tf

# Hangul (Unicode §3.12): syllables are L V (T) jamo composed arithmetically.
_S_BASE, _L_BASE, _V_BASE, _T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
_L_COUNT, _V_COUNT, _T_COUNT, _S_COUNT = 19, 21, 28, 11172
# Composition pairs are keyed (first << 21) | second: code points have 21 bits.
_SHIFT = 21


@functools.cache
def nfc_tables() -> tuple[dict[str, str], dict[int, int], dict[int, int], frozenset[int]]:
    """From Python's unicodedata: (full canonical decomposition by character, combining class
    by code point (non-zero only), primary composite by pair key, code points that can be the
    second of a composition)."""
    decompositions: dict[str, str] = {}
    classes: dict[int, int] = {}
    pairs: dict[int, int] = {}
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:  # surrogates never occur in UTF-8 text
            continue
        char = chr(cp)
        if unicodedata.combining(char):
            classes[cp] = unicodedata.combining(char)
        mapping = unicodedata.decomposition(char)
        if not mapping or mapping.startswith("<"):  # none, or a compatibility mapping (NFKC's)
            continue
        decompositions[char] = unicodedata.normalize("NFD", char)
        parts = [int(p, 16) for p in mapping.split()]
        # A primary composite: two parts and not excluded from composition (NFC keeps it).
        if len(parts) == 2 and unicodedata.normalize("NFC", char) == char:
            pairs[parts[0] << _SHIFT | parts[1]] = cp
    seconds = frozenset(key & ((1 << _SHIFT) - 1) for key in pairs)
    seconds |= set(range(_V_BASE, _V_BASE + _V_COUNT)) | set(range(_T_BASE + 1, _T_BASE + _T_COUNT))
    return decompositions, classes, pairs, seconds


class GraphNFC(tf.Module):
    """`normalize(text)`: NFC of a scalar string, as `unicodedata.normalize("NFC", text)`.

    Invalid UTF-8 is left as it is when nothing needs normalising, else it becomes U+FFFD.
    """

    def __init__(self) -> None:
        super().__init__(name="nfc")
        decompositions, classes, pairs, seconds = nfc_tables()

        def table(keys: list, values: list, key_dtype: tf.DType, value_dtype: tf.DType,
                  default: object) -> tf.lookup.StaticHashTable:
            return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, key_dtype), tf.constant(values, value_dtype)), default_value=default)

        self.decompositions = table(list(decompositions), list(decompositions.values()), tf.string,
                                    tf.string, "")
        self.classes = table(list(classes), list(classes.values()), tf.int32, tf.int32, 0)
        self.composites = table(list(pairs), list(pairs.values()), tf.int64, tf.int32, -1)
        self.seconds = table(sorted(seconds), [1] * len(seconds), tf.int32, tf.int32, 0)
        # Characters that may change anything: a decomposition, a combining class, or a second.
        active = sorted({*decompositions, *map(chr, classes), *map(chr, seconds)})
        self.active = table(active, [True] * len(active), tf.string, tf.bool, False)

    def normalize(self, text: tf.Tensor) -> tf.Tensor:
        chars = tf.strings.unicode_split(text, "UTF-8", errors="replace")
        return tf.cond(tf.reduce_any(self.active.lookup(chars)), lambda: self._nfc(chars), lambda: text)

    def _nfc(self, chars: tf.Tensor) -> tf.Tensor:
        decomposed = self.decompositions.lookup(chars)
        joined = tf.strings.reduce_join(tf.where(tf.strings.length(decomposed) > 0, decomposed, chars))
        cps = tf.strings.unicode_decode(joined, "UTF-8")
        classes = self.classes.lookup(cps)
        # Canonical ordering: each starter with the marks after it is one run; a stable sort by
        # (run, class) orders the marks of each run by class and moves nothing else.
        run = tf.cast(tf.cumsum(tf.cast(tf.equal(classes, 0), tf.int64)), tf.int64)
        order = tf.argsort(run * 256 + tf.cast(classes, tf.int64), stable=True)
        cps, classes = tf.gather(cps, order), tf.gather(classes, order)
        return tf.strings.unicode_encode(self._compose(cps, classes), "UTF-8")

    def _compose(self, cps: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
        """Canonical composition of ordered code points (UAX #15 §1.3, D117)."""
        n = tf.size(cps)
        second = tf.greater(self.seconds.lookup(cps), 0)
        # A segment starts at each starter nothing composes into (and at the text's start).
        begins = tf.logical_and(tf.equal(classes, 0), tf.logical_not(second))
        begins = tf.logical_or(begins, tf.equal(tf.range(n), 0))
        starts = tf.cast(tf.reshape(tf.where(begins), [-1]), tf.int32)
        lengths = tf.concat([starts[1:], [n]], axis=0) - starts
        # Per segment: where its current starter is (-1: none yet), the starter's value as
        # composed so far, and the class of the last mark kept since it (-1: none; a kept
        # starter-class character becomes the starter).
        first_is_starter = tf.equal(tf.gather(classes, starts), 0)
        state = (tf.where(first_is_starter, starts, -1), tf.gather(cps, starts),
                 tf.where(first_is_starter, -1, 256))

        def step(j, starter, value, last, out, keep):
            active = lengths > j
            pos = tf.minimum(starts + j, n - 1)
            char, cls = tf.gather(cps, pos), tf.gather(classes, pos)
            # Blocked when a kept character since the starter has class 0 or >= this one's;
            # kept marks are in class order, so the last one decides.
            unblocked = active & (starter >= 0) & ((last < 0) | (last < cls))
            composite = self._composite(value, char)
            merged = unblocked & (composite >= 0)
            new_starter = active & ~merged & tf.equal(cls, 0)
            kept_mark = active & ~merged & (cls > 0)
            # A starter that is left behind gets its final value now.
            done = new_starter & (starter >= 0)
            out = tf.tensor_scatter_nd_update(out, tf.where(done, starter, n)[:, None],
                                              value, )
            keep = tf.tensor_scatter_nd_update(keep, tf.where(merged, pos, n)[:, None],
                                               tf.zeros_like(merged))
            value = tf.where(merged, composite, tf.where(new_starter, char, value))
            starter = tf.where(new_starter, pos, starter)
            last = tf.where(new_starter, -1, tf.where(kept_mark, cls, last))
            return j + 1, starter, value, last, out, keep

        # One spare slot at index n takes the updates of segments with nothing to write.
        out0, keep0 = tf.concat([cps, [0]], axis=0), tf.ones([n + 1], tf.bool)
        _, starter, value, _, out, keep = tf.while_loop(
            lambda j, *_: j < tf.reduce_max(lengths), step, (tf.constant(1), *state, out0, keep0))
        out = tf.tensor_scatter_nd_update(out, tf.where(starter >= 0, starter, n)[:, None], value)
        return tf.boolean_mask(out[:n], keep[:n])

    def _composite(self, first: tf.Tensor, second: tf.Tensor) -> tf.Tensor:
        """The primary composite of each pair, -1 where there is none."""
        key = tf.bitwise.left_shift(tf.cast(first, tf.int64), _SHIFT) | tf.cast(second, tf.int64)
        table = self.composites.lookup(key)
        l_index, v_index = first - _L_BASE, second - _V_BASE
        s_index, t_index = first - _S_BASE, second - _T_BASE
        lv = ((l_index >= 0) & (l_index < _L_COUNT) & (v_index >= 0) & (v_index < _V_COUNT))
        lvt = ((s_index >= 0) & (s_index < _S_COUNT) & tf.equal(s_index % _T_COUNT, 0)
               & (t_index > 0) & (t_index < _T_COUNT))
        hangul = tf.where(lv, _S_BASE + (l_index * _V_COUNT + v_index) * _T_COUNT, first + t_index)
        return tf.where(lv | lvt, hangul, table)
