"""The small-GPT reference of bench/quality.py and bench/budget.py, run in bench's torch venv
(torch is never a verne dependency): the "baby GPT" recipe for character-level text, written out here.

    bench/.venv-torch/bin/python bench/gpt_reference.py --corpus input.txt [--iters 2000]
    bench/.venv-torch/bin/python bench/gpt_reference.py --tokens DIR --seconds 600 --eval_every 0 \
        [--layers 6 --heads 6 --width 192 --block 128 --batch 32]

Recipe (the issue's, as nanoGPT's shakespeare_char config runs it, scaled to 4x4x128): 4 layers,
4 heads, width 128, block 64, batch 12, no dropout, no biases, tied embeddings, learned positions,
GPT-2 initialisation (normal 0.02, residual projections 0.02/sqrt(2 layers)); AdamW lr 1e-3,
betas (0.9, 0.99), weight decay 0.1 on matrices only, gradient clip 1.0, 100 warm-up iterations
then cosine decay to 1e-4 at the last iteration. With --corpus: train on the first 90% of the
text, validate on the rest, characters as the vocabulary. With --tokens: the token ids verne
trains on (DIR/train.npy, DIR/valid.npy, DIR/vocab.json, written by bench/budget.py from verne's
shards), so both models are scored on the same ids. An estimate of the validation loss (200
random blocks) every --eval_every iterations (250, as the recipe; 0: none) is part of the timed run.

--seconds S replaces --iters: the iteration count that ends training S seconds after this
process started (imports included). The step time is measured on the first warm-up steps (whose
learning rate does not depend on the count), the iterations are the seconds left divided by it,
and the count is corrected every 50 steps from the step time measured since, until 90% of S is
spent (see Calibration); the cosine schedule ends at the last iteration.

Prints one JSON line per 50 iterations ({"step", "loss": mean training loss of those 50, "seconds":
since process start}) and at the end {"final": iterations, "valid_loss": loss over every token of
the validation split (non-overlapping blocks, the last one shorter), "seconds": from process start
to the end of training, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

STARTED = time.monotonic()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.up, self.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, heads: int, width: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(parameter, 0.0, std)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def learning_rate(step: int, iters: int, peak: float = 1e-3, floor: float = 1e-4, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(iters - warmup, 1), 1.0)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def batch(data: torch.Tensor, size: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(data) - block - 1, (size,))
    x = torch.stack([data[s:s + block] for s in starts])
    return x, torch.stack([data[s + 1:s + 1 + block] for s in starts])


@torch.no_grad()
def whole_split_loss(model: GPT, data: torch.Tensor, block: int, rows: int = 256) -> float:
    """Mean loss over every token of `data` after its first: non-overlapping blocks, the last one
    as long as what is left."""
    targets = len(data) - 1
    count = targets // block
    x = data[:count * block].view(count, block)
    y = data[1:count * block + 1].view(count, block)
    total, shown = 0.0, time.monotonic()
    for i in range(0, count, rows):
        total += model(x[i:i + rows], y[i:i + rows]).item() * x[i:i + rows].numel()
        if time.monotonic() - shown > 30:  # a large split takes minutes: say how far it is
            shown = time.monotonic()
            print(json.dumps({"evaluated": min(i + rows, count) * block, "of": targets}), flush=True)
    rest = targets - count * block
    if rest:
        tail = data[count * block:]
        total += model(tail[:-1].view(1, rest), tail[1:].view(1, rest)).item() * rest
    return total / targets


def load_tokens(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, valid ids, vocabulary size) from --tokens or --corpus."""
    if args.tokens:
        import numpy as np

        vocab = json.load(open(f"{args.tokens}/vocab.json", encoding="utf-8"))["vocab_size"]
        train, valid = (torch.from_numpy(np.load(f"{args.tokens}/{split}.npy").astype(np.int64))
                        for split in ("train", "valid"))
        return train, valid, vocab
    text = open(args.corpus, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:], len(chars)


def make_optimizer(model: GPT) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                              {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))


def train_step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


class Calibration:
    """--seconds: the iteration count from the step time measured while training.

    The warm-up's learning rate does not depend on the iteration count, so the first steps train
    as they would in any run while they are timed; the count is fixed before the warm-up ends,
    in time for the cosine decay to use it. The first `skip` steps (allocation, thread start-up)
    are not counted. A step's time drifts after those first seconds (by -14% to +11% in 1- and
    10-minute runs here), so `replan` corrects the count from the mean step time since it was
    fixed, until `until` of the budget is spent: the decay's progress moves by a few percent at
    most, and training ends within a few steps of the budget."""

    def __init__(self, seconds: float, measure: float, warmup: int, skip: int = 3, until: float = 0.9,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.measure, self.warmup, self.skip, self.until = seconds, measure, warmup, skip, until
        self.clock = clock
        self.times: list[float] = []
        self.step_seconds: float | None = None
        self.fixed: tuple[int, float] | None = None  # (steps done, clock) when the count was fixed
        self.replans = 0

    def iters(self, step: int, took: float) -> int | None:
        """After step `step` (0-based) took `took` seconds: the iteration count, once known."""
        self.times.append(took)
        counted = self.times[self.skip:]
        enough = len(counted) >= 5 and sum(counted) >= self.measure
        if not enough and step + 2 < self.warmup:
            return None
        self.step_seconds = sum(counted or self.times) / len(counted or self.times)
        self.fixed = (step + 1, self.clock())
        return step + 1 + max(0, int(self.left() / self.step_seconds))

    def left(self) -> float:
        return self.seconds - (self.clock() - STARTED)

    def replan(self, done: int, iters: int) -> int:
        """The count after `done` steps: `iters`, or what the step time since it was fixed says
        fills the budget (never fewer than `done` + 1)."""
        if self.fixed is None or done - self.fixed[0] < 20 or self.left() < (1 - self.until) * self.seconds:
            return iters
        self.step_seconds = (self.clock() - self.fixed[1]) / (done - self.fixed[0])
        planned = max(done + 1, done + int(self.left() / self.step_seconds))
        self.replans += planned != iters
        return planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="a text file: characters, first 90%% train, the rest valid")
    source.add_argument("--tokens", help="a directory of train.npy, valid.npy and vocab.json")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="fill this wall clock from process start with training (replaces --iters)")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="the recipe's periodic validation estimate (0: none; default 250, "
                             "with --seconds 0: the calibration does not time it)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, valid, vocab = load_tokens(args)
    block, size = args.block, args.batch
    model = GPT(vocab, block, layers=args.layers, heads=args.heads, width=args.width)
    eval_every = (0 if args.seconds > 0 else 250) if args.eval_every is None else args.eval_every
    warmup = 100
    calibration = Calibration(args.seconds, min(10.0, max(2.0, 0.03 * args.seconds)), warmup)
    iters = None if args.seconds > 0 else args.iters
    optimizer = make_optimizer(model)
    window: list[float] = []
    step = 0
    while iters is None or step < iters:
        last = iters is not None and step == iters - 1
        if eval_every and (step % eval_every == 0 or last):
            model.eval()  # the recipe's periodic estimate, timed with the rest
            with torch.no_grad():
                estimate = sum(model(*batch(valid, size, block)).item() for _ in range(200)) / 200
            model.train()
            print(json.dumps({"step": step, "valid_estimate": round(estimate, 4)}), flush=True)
        tick = time.monotonic()
        window.append(train_step(model, optimizer, *batch(train, size, block),
                                 learning_rate(step, iters or warmup + 1, warmup=warmup)))
        if iters is None:
            iters = calibration.iters(step, time.monotonic() - tick)
            if iters is not None:
                print(json.dumps({"iters": iters, "step_seconds": round(calibration.step_seconds, 5),
                                  "seconds": round(time.monotonic() - STARTED, 2)}), flush=True)
        step += 1
        if args.seconds > 0 and step % 50 == 0 and iters is not None:
            replanned = calibration.replan(step, iters)
            if abs(replanned - iters) > 0.01 * iters:
                print(json.dumps({"iters": replanned, "was": iters,
                                  "step_seconds": round(calibration.step_seconds, 5),
                                  "seconds": round(time.monotonic() - STARTED, 2)}), flush=True)
            iters = replanned
        if step % 50 == 0:
            print(json.dumps({"step": step, "loss": round(sum(window) / len(window), 4),
                              "seconds": round(time.monotonic() - STARTED, 2)}), flush=True)
            window = []
    trained = time.monotonic() - STARTED
    model.eval()
    print(json.dumps({"final": iters, "valid_loss": round(whole_split_loss(model, valid, block), 4),
                      "seconds": round(trained, 1), "valid_tokens": len(valid), "train_tokens": len(train),
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "step_seconds": calibration.step_seconds, "replans": calibration.replans}), flush=True)


if __name__ == "__main__":
    main()
