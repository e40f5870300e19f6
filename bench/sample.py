"""Generation speed: verne's path (prime once, carry the state, one compiled loop) against the
naive loop that re-runs the whole prefix for every new token, measured in the same run.

    .venv/bin/python -m bench.sample [--length 500] [--layers 2] [--state 512] [--embedding 128]

Prints tokens/s of both at batch 1, their ratio (target >= 20x), and verne's tokens/s at batch 32.
The naive loop is given every advantage: its forward pass is compiled too (prefixes padded to a
multiple of 32 so it traces 16 times, not 500), and tracing happens before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.hparams import HParams, resolve_precision  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.sampling import Generator, SamplingOptions  # noqa: E402

VOCAB = 65
BUCKET = 32


def naive_generate(model: tf.keras.Model, forward: tf.types.experimental.GenericFunction,
                   prime: list[int], length: int, seed: int = 1) -> list[int]:
    """Re-runs the model over the whole text so far for every token (what this issue replaces)."""
    rng = np.random.default_rng(seed)
    tokens = list(prime)
    for _ in range(length):
        padded = -(-len(tokens) // BUCKET) * BUCKET
        window = np.zeros([1, padded], np.int32)
        window[0, :len(tokens)] = tokens
        logits = forward(tf.constant(window))[0, len(tokens) - 1].numpy()
        probs = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return tokens[len(prime):]


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--state", type=int, default=512)
    parser.add_argument("--embedding", type=int, default=128)
    args = parser.parse_args()
    # Resolved as trainer.task resolves it, so this measures what a default model samples at here.
    hparams = resolve_precision(HParams(language_model="char", vocab_size=VOCAB, layers=args.layers,
                                        lstm_state_size=args.state, embedding_size=args.embedding).validate())
    model = build_model(hparams)
    prime = [1, 2, 3]
    print(f"model: {hparams.cell} {args.layers}x{args.state} {hparams.precision}, "
          f"embedding {args.embedding}, vocab {VOCAB}; "
          f"{args.length} new tokens after a {len(prime)}-token prime", flush=True)

    tf.get_logger().setLevel("ERROR")  # the naive loop's 16 traces are deliberate
    forward = tf.function(lambda tokens: model(tokens, model.initial_state(1))[0])
    for padded in range(BUCKET, len(prime) + args.length + BUCKET, BUCKET):
        forward(tf.zeros([1, padded], tf.int32))  # trace every bucket before timing
    naive = args.length / timed(naive_generate, model, forward, prime, args.length)
    print(f"naive (re-run the prefix per token, compiled), batch 1: {naive:,.0f} tokens/s", flush=True)

    generator = Generator(model)
    options = SamplingOptions(temperature=1.0, seed=1)
    rates = {}
    for batch in (1, 32):
        generator.generate(prime, args.length, options, batch)  # trace
        rates[batch] = batch * args.length / timed(generator.generate, prime, args.length, options, batch)
        print(f"verne (prime once, state carried, compiled loop), batch {batch}: "
              f"{rates[batch]:,.0f} tokens/s", flush=True)
    print(f"ratio verne/naive at batch 1: {rates[1] / naive:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
