"""The PyTorch reference of bench/train.py, run in its own venv (torch is never a verne dependency).

A small line protocol on stdin/stdout, so the parent can interleave timed blocks of both frameworks
in one run without paying torch's start-up and warm-up each time:
    -> "run STEPS fp32|bf16"   <- one JSON line: per-step seconds and the forward/backward/optimizer split
    -> "quit"                  <- one JSON line: peak RSS
The model is the issue's: nn.Embedding -> nn.LSTM/nn.GRU (batch_first) -> nn.Linear (optionally tied
to the embedding, with dropout between layers and before it), Adam, cross-entropy,
and global-norm gradient clipping like verne's default, so both sides do the same work per step.
`--cell gpt`: bench/gpt_reference.py's GPT (layers x heads x --state, block --unroll, tied) with
its AdamW (weight decay 0.1 on matrices, betas 0.9/0.99) and clip 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    rnn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[args.cell]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(args.vocab, args.embedding)
            # Dropout between layers and before the output: the sites verne's --dropout uses.
            self.rnn = rnn_class(args.embedding, args.state, args.layers, batch_first=True,
                                 dropout=args.dropout if args.layers > 1 else 0.0)
            self.dropout = torch.nn.Dropout(args.dropout)
            self.output = torch.nn.Linear(args.state, args.vocab)
            if args.tied:
                self.output.weight = self.embedding.weight

        def forward(self, tokens: torch.Tensor, state: object) -> tuple[torch.Tensor, object]:
            hidden, state = self.rnn(self.embedding(tokens), state)
            return self.output(self.dropout(hidden)), state

    torch.manual_seed(1)
    model = Model()
    return model, torch.optim.Adam(model.parameters(), lr=2e-3)


def build_gpt(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from gpt_reference import GPT  # beside this file

    torch.manual_seed(1)
    model = GPT(args.vocab, args.unroll, args.layers, args.heads, args.state)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                   {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    return model, optimizer


def detach(state: object) -> object:
    # float() too: under autocast the state comes back in bfloat16.
    if isinstance(state, tuple):
        return tuple(s.detach().float() for s in state)
    return state.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("layers", 2), ("state", 512), ("embedding", 128), ("vocab", 65),
                          ("batch", 64), ("unroll", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--cell", default="lstm", help="lstm, gru or gpt")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (gpt)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--tied", action="store_true", help="output weight = embedding table (sizes equal)")
    args = parser.parse_args()
    gpt = args.cell == "gpt"
    model, optimizer = build_gpt(args) if gpt else build(args)
    clip = 1.0 if gpt else 5.0
    tokens = torch.randint(0, args.vocab, (args.batch, args.unroll))
    labels = torch.randint(0, args.vocab, (args.batch, args.unroll))
    state = None

    def step(bf16: bool) -> tuple[float, float, float]:
        nonlocal state
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # Stateful truncated BPTT, as verne trains: the state carries over, detached.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if gpt:  # windows stand alone; the model returns its loss (float32 under autocast)
                loss, new_state = model(tokens, labels), None
            else:
                logits, new_state = model(tokens, state)
        if not gpt:
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab),
                                                     labels.reshape(-1))
        forward = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        backward = time.perf_counter()
        optimizer.step()
        state = None if gpt else detach(new_state)
        end = time.perf_counter()
        return forward - start, backward - forward, end - backward

    for bf16 in (False, True):  # warm-up: oneDNN primitive caches, allocator
        for _ in range(2):
            step(bf16)
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "quit":
            break
        steps, bf16 = int(words[1]), words[2] == "bf16"
        step(bf16)  # one untimed step after switching precision
        splits = [step(bf16) for _ in range(steps)]
        print(json.dumps({"splits": splits}), flush=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}), flush=True)


if __name__ == "__main__":
    main()
