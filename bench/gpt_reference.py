"""The small-GPT reference of bench/quality.py, run in bench's torch venv (torch is never a verne
dependency): the "baby GPT" recipe for character-level tinyshakespeare, written out here.

    bench/.venv-torch/bin/python bench/gpt_reference.py --corpus input.txt [--iters 2000]

Recipe (the issue's, as nanoGPT's shakespeare_char config runs it, scaled to 4x4x128): 4 layers,
4 heads, width 128, block 64, batch 12, no dropout, no biases, tied embeddings, learned positions,
GPT-2 initialisation (normal 0.02, residual projections 0.02/sqrt(2 layers)); AdamW lr 1e-3,
betas (0.9, 0.99), weight decay 0.1 on matrices only, gradient clip 1.0, 100 warm-up iterations
then cosine decay to 1e-4 at the last iteration. Train on the first 90% of the text, validate on
the rest; an estimate of the validation loss (200 random blocks) every 250 iterations, as that
recipe does, is part of the timed run.

Prints one JSON line per 50 iterations ({"step", "loss": mean training loss of those 50, "seconds":
since process start}) and at
the end {"final": ..., "valid_loss": loss over the whole validation split in non-overlapping
blocks, "seconds": from process start}.
"""

from __future__ import annotations

import argparse
import json
import math
import time

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
    """Mean loss over every token of `data`, in non-overlapping blocks."""
    count = (len(data) - 1) // block
    x = data[:count * block].view(count, block)
    y = data[1:count * block + 1].view(count, block)
    total = sum(model(x[i:i + rows], y[i:i + rows]).item() * len(x[i:i + rows])
                for i in range(0, count, rows))
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = open(args.corpus, encoding="utf-8").read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    train, valid = data[:cut], data[cut:]
    block, size = 64, 12
    model = GPT(len(vocab), block, layers=4, heads=4, width=128)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                   {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    window: list[float] = []
    for step in range(args.iters):
        if step % 250 == 0 or step == args.iters - 1:  # the recipe's periodic estimate, timed with the rest
            model.eval()
            with torch.no_grad():
                estimate = sum(model(*batch(valid, size, block)).item() for _ in range(200)) / 200
            model.train()
            print(json.dumps({"step": step, "valid_estimate": round(estimate, 4)}), flush=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.iters)
        loss = model(*batch(train, size, block))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % 50 == 0:
            print(json.dumps({"step": step + 1, "loss": round(sum(window) / len(window), 4),
                              "seconds": round(time.monotonic() - STARTED, 2)}), flush=True)
            window = []
    trained = time.monotonic() - STARTED
    model.eval()
    print(json.dumps({"final": args.iters, "valid_loss": round(whole_split_loss(model, valid, block), 4),
                      "seconds": round(trained, 1)}), flush=True)


if __name__ == "__main__":
    main()
