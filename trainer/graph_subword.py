"""The bpe/unigram tokenizers of `preprocessing.subword` in plain TensorFlow ops, for the export.

Why not tensorflow-text's SentencePiece op: tensorflow-text 2.21's wheel requires the full
`tensorflow` package, which cannot be installed beside verne's `tensorflow-cpu` with `pip check`
clean, and a SavedModel using its op would not load without `import tensorflow_text`. These ops
are in TensorFlow itself, so the export loads with plain `tf.saved_model.load`.

Encoding follows SentencePiece's own algorithms on the learned model's pieces and scores
(tests/test_subword.py checks the ids equal SentencePiece's on held-out text):
- bpe: start from the characters (spaces written as "▁"); repeatedly merge the adjacent pair
  whose concatenation is the highest-scoring piece, the leftmost one on ties;
- unigram: the Viterbi segmentation maximising the sum of piece scores; a character that is no
  piece scores the lowest piece score minus 10 (SentencePiece's unknown penalty); on equal
  totals the longest last piece wins, as SentencePiece keeps the earliest start;
- then byte fallback: a symbol that is not a piece becomes the byte pieces of its UTF-8.
BPE merges one pair per loop step, each step over the whole prime: its cost grows with the square
of the prime's length, so the export caps bpe primes (`trainer.export.MAX_BPE_PRIME_CHARS`).
Unigram's Viterbi is one step per character (linear). Callers pass NFC text (`trainer.graph_nfc`).
Decoding maps each id to its bytes ("▁" → space, `<0xNN>` → the byte) and replaces invalid UTF-8.
"""

from __future__ import annotations

import tensorflow as tf

from preprocessing import subword

# SentencePiece's penalty for a character that no piece covers (unigram_model.cc kUnkPenalty).
_UNKNOWN_PENALTY = 10.0
_NO_PIECE = float("-inf")


class SubwordGraph(tf.Module):
    """Tables of one learned tokenizer and `encode` / `decode` as TF ops."""

    def __init__(self, table: subword.PieceTable) -> None:
        super().__init__(name="subword")
        self.kind = table.kind
        keys = [p for p, m in zip(table.pieces, table.matchable, strict=True) if m]
        ids = [i for i, m in enumerate(table.matchable) if m]
        scores = [table.scores[i] for i in ids]
        self.ids = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.constant(ids, tf.int32)), default_value=-1)
        self.scores = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.constant(scores, tf.float32)),
            default_value=_NO_PIECE)
        self.byte_ids = tf.constant(table.byte_ids, tf.int32)
        self.text = tf.constant(list(table.text))
        self.max_chars = max(len(k) for k in keys)
        self.unknown_score = min(scores) - _UNKNOWN_PENALTY

    def encode(self, text: tf.Tensor) -> tf.Tensor:
        """int32 [N]: the ids of a scalar string (already normalised as the corpus was)."""
        chars = tf.strings.unicode_split(tf.strings.regex_replace(text, " ", subword.SPACE_MARK), "UTF-8")
        symbols = self._bpe(chars) if self.kind == "bpe" else self._unigram(chars)
        return self._byte_fallback(symbols)

    def decode(self, tokens: tf.Tensor) -> tf.Tensor:
        """string [...]: the text of ids [..., L], invalid UTF-8 (a cut byte sequence) as U+FFFD."""
        joined = tf.strings.reduce_join(tf.gather(self.text, tokens), axis=-1)
        return tf.strings.unicode_transcode(joined, "UTF-8", "UTF-8", errors="replace")

    def _bpe(self, symbols: tf.Tensor) -> tf.Tensor:
        def merge(symbols: tf.Tensor, _: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            pairs = tf.strings.join([symbols[:-1], symbols[1:]])
            scores = self.scores.lookup(pairs)
            found = tf.reduce_any(scores > _NO_PIECE)

            def merged() -> tf.Tensor:
                i = tf.where(tf.equal(scores, tf.reduce_max(scores)))[0, 0]  # the leftmost best
                return tf.concat([symbols[:i], pairs[i:i + 1], symbols[i + 2:]], axis=0)

            return tf.cond(found, merged, lambda: symbols), found

        symbols, _ = tf.while_loop(lambda _, more: more, merge, (symbols, tf.size(symbols) > 1),
                                   shape_invariants=(tf.TensorShape([None]), tf.TensorShape([])))
        return symbols

    def _unigram(self, chars: tf.Tensor) -> tf.Tensor:
        n = tf.size(chars)
        # scores[e, l-1]: score of the piece of l characters ending at character e (inclusive).
        columns, ending = [], chars
        for length in range(1, self.max_chars + 1):
            if length > 1:
                ending = tf.strings.join([tf.concat([[""], ending], axis=0)[:n], chars])
            score = tf.where(tf.range(n) >= length - 1, self.scores.lookup(ending), _NO_PIECE)
            if length == 1:
                score = tf.where(score > _NO_PIECE, score, self.unknown_score)
            columns.append(score)
        scores = tf.stack(columns, axis=1)
        lengths = tf.range(1, self.max_chars + 1)

        def step(end: tf.Tensor, best: tf.Tensor, back: tf.Tensor) -> tuple[tf.Tensor, ...]:
            totals = tf.gather(best, tf.maximum(end - lengths, 0)) + scores[end - 1]
            top = tf.reduce_max(totals)
            # The last (longest) of equal totals: SentencePiece keeps the earliest start.
            length = tf.cast(tf.reduce_max(tf.where(tf.equal(totals, top))), tf.int32) + 1
            return (end + 1, tf.tensor_scatter_nd_update(best, [[end]], [top]),
                    tf.tensor_scatter_nd_update(back, [[end]], [length]))

        _, _, back = tf.while_loop(lambda end, *_: end <= n, step,
                                   (tf.constant(1), tf.zeros([n + 1]), tf.zeros([n + 1], tf.int32)))

        def backtrack(end: tf.Tensor, pieces: tf.TensorArray) -> tuple[tf.Tensor, tf.TensorArray]:
            start = end - back[end]
            return start, pieces.write(pieces.size(), tf.strings.reduce_join(chars[start:end]))

        _, pieces = tf.while_loop(lambda end, _: end > 0, backtrack,
                                  (n, tf.TensorArray(tf.string, size=0, dynamic_size=True,
                                                     element_shape=[])))
        return tf.reverse(pieces.stack(), axis=[0])

    def _byte_fallback(self, symbols: tf.Tensor) -> tf.Tensor:
        """Ids of the symbols; a symbol that is no piece becomes its bytes' pieces."""
        ids = self.ids.lookup(symbols)
        split = tf.strings.bytes_split(symbols)
        counts = split.row_lengths()
        # Every flat value is one byte, so decode_raw's [k, 1] flattens to the k byte values.
        values = tf.gather(self.byte_ids,
                           tf.cast(tf.reshape(tf.io.decode_raw(split.flat_values, tf.uint8), [-1]), tf.int32))
        known = tf.repeat(ids >= 0, counts)
        first = tf.equal(tf.ragged.range(counts).flat_values, 0)
        merged = tf.where(known, tf.repeat(ids, counts), values)
        return tf.boolean_mask(merged, tf.logical_or(tf.logical_not(known), first))
