"""Gradient accumulation over micro-batches of different sizes, weighted by their tokens.

A small causal language model trains on sequences of random length, padded per
micro-batch, with ``ignore_index=-100`` on the padding. Each micro-batch holds a different
number of real tokens, so averaging per-micro-batch mean losses (mmengine's rule, and the
transformers Trainer's before late 2024) gives short micro-batches too much weight. With
``update_params(loss, num_items=n)`` the loss is the *sum* over the micro-batch's tokens,
and hwoptim divides the accumulated gradients by the window's token count (over every
data-parallel rank, on the device, without a host sync): the gradient of the mean loss per
token of the whole window. ``wrapper.last_loss`` is that mean, as a device tensor.

``--check`` trains two more copies from the same start: plain torch doing, per window, the
sum of all token losses divided by the token count (what num_items promises), and hwoptim
with mmengine's rule (the mean loss per micro-batch); it prints how far each ends from
hwoptim with num_items.

    python examples/variable_size_batches.py
    python examples/variable_size_batches.py --check --device cpu
"""
# smoke-args: --steps 7 --accum 3 --log-every 3 --check
# smoke-expect: same as the per-token reference
# smoke-expect: done: 7 micro-batches, 3 optimizer updates

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn import functional as F

from hwoptim import AmpOptimWrapper

VOCAB, DIM, IGNORE = 32, 16, -100


class TinyCausalLM(nn.Module):
    """Embedding, a causal running mean over the sequence, and a next-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        context = h.cumsum(dim=1) / steps[None, :, None]  # sees only earlier tokens
        return self.head(torch.tanh(self.mix(context)))


def micro_batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 to 6 sequences of 2 to 24 tokens, right-padded; labels are the next tokens,
    IGNORE where there is none (past a sequence's end)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = int(torch.randint(1, 7, (), generator=g))
    lengths = torch.randint(2, 25, (rows,), generator=g)
    width = int(lengths.max())
    first = torch.randint(0, VOCAB, (rows, 1), generator=g)
    tokens = (first * 5 ** torch.arange(width) + 3 * torch.arange(width)) % VOCAB  # learnable
    labels = tokens.roll(-1, dims=1)
    labels[torch.arange(width)[None, :] >= lengths[:, None] - 1] = IGNORE
    return tokens, labels


def token_loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of the token losses (reduction="sum"): hwoptim divides by the count."""
    logits = model(tokens)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def train(model: nn.Module, args: argparse.Namespace, *, rule: str = "num_items") -> AmpOptimWrapper:
    """hwoptim's loop; rule "num_items" (per token) or "mmengine" (per micro-batch mean)."""
    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=args.lr), device=args.device,
        dtype=args.dtype, accumulative_counts=args.accum, clip_grad=dict(max_norm=1.0),
    )
    model.to(wrapper.device)
    wrapper.initialize_count_status(model, 0, args.steps)
    for step in range(args.steps):
        tokens, labels = (t.to(wrapper.device) for t in micro_batch(step, args.seed))
        with wrapper.optim_context(model):
            loss = token_loss_sum(model, tokens, labels)
        if rule == "num_items":
            # a device tensor (or an int): counted on the device, never read back here
            wrapper.update_params(loss, num_items=(labels != IGNORE).sum())
        else:
            wrapper.update_params(loss / (labels != IGNORE).sum())  # mean, then / window
        if rule == "num_items" and wrapper.should_update() and (step + 1) % args.log_every == 0:
            # one host sync, at log time only: the mean loss per token of the last window
            print(f"step {step + 1:4d}  loss per token {float(wrapper.last_loss):.4f}")
    return wrapper


def reference(model: nn.Module, args: argparse.Namespace) -> None:
    """Plain torch: per window, the sum of its token losses over its token count."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for start in range(0, args.steps, args.accum):
        batches = [micro_batch(s, args.seed) for s in range(start, min(start + args.accum, args.steps))]
        total = sum(token_loss_sum(model, t, y) for t, y in batches)
        loss = total / sum((y != IGNORE).sum() for _, y in batches)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="micro-batches")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="autocast dtype (default: the device's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=12)
    parser.add_argument("--check", action="store_true",
                        help="compare with plain torch and with mmengine's rule (float32 math)")
    args = parser.parse_args(argv)
    if args.check and args.dtype is None:
        args.dtype = "float32"  # the comparison is about the rule, not autocast rounding

    torch.manual_seed(args.seed)
    model = TinyCausalLM()
    start = copy.deepcopy(model)
    wrapper = train(model, args)
    updates = -(-args.steps // args.accum)
    if args.check:
        per_token = copy.deepcopy(start)
        reference(per_token, args)
        per_batch = copy.deepcopy(start)
        train(per_batch, args, rule="mmengine")
        same = max_difference(model, per_token)
        print(f"num_items: same as the per-token reference (max |diff| {same:.1e})"
              if same < 1e-5 else f"num_items DIFFERS from the per-token reference by {same:.1e}")
        print(f"mmengine's rule (mean per micro-batch) ends {max_difference(model, per_batch):.1e} away")
    skipped = wrapper.skipped_steps
    print(f"done: {args.steps} micro-batches, {updates} optimizer updates, "
          f"{0 if skipped is None else int(skipped)} skipped")


if __name__ == "__main__":
    main()
