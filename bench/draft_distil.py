"""Speculative decoding's accept path at speed: a small drafter distilled against a random target.

    python bench/draft_distil.py [--steps 300] [--rounds 5] [--draft-tokens 3] [--out bench/results/NAME.json]

Random weights accept almost no draft, so this trains one. The target is E2B's layer schedule (35
layers, KV sharing, PLE) at hidden 512 and a 4096-token vocabulary; the drafter is a 3-layer
assistant (hidden 256) reading the target's K/V, as Google's. Training data is the target's own
greedy text from random prompts: for each position, the drafter sees the target's embedding of the
token there and its hidden state before, and learns the target's next N tokens (teacher-forced, the
drafter's own hidden state fed back as in drafting). Then, on held-out prompts, greedy decoding with
and without the drafter (eager, one process, alternating), from held-out prompts and from training
prompts: the tokens must be equal; prints the acceptance rate, tokens per target step and the
decode speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

import g4
from g4.config import FULL, SLIDING, AssistantConfig
from g4.fn.draft import draft_step, target_kv
from g4.fn.model import embed, hidden_states
from g4.generation import Drafter, EagerModel, generate
from g4.params import init_assistant, tree_map

TARGET = attrs.evolve(
    g4.CONFIGS["e2b"],
    vocab_size=4096,
    vocab_size_per_layer_input=4096,
    hidden_size=512,
    intermediate_size=1024,
    head_dim=64,
    global_head_dim=128,
    hidden_size_per_layer_input=64,
    sliding_window=64,
)
ASSISTANT = AssistantConfig.for_target(
    TARGET, hidden_size=256, intermediate_size=512, num_attention_heads=4, layer_types=(SLIDING, SLIDING, FULL)
)
PROMPT, LENGTH = 8, 72  # random prompt tokens, sequence length with the target's greedy continuation


@torch.no_grad()
def greedy_text(params: g4.Params, n: int, seed: int) -> torch.Tensor:
    """`n` sequences: a random prompt, then the target's greedy continuation `[n, LENGTH]`."""
    ids = torch.randint(3, TARGET.vocab_size, (n, PROMPT), generator=torch.Generator().manual_seed(seed))
    cache = g4.init_cache(TARGET, batch=n, max_seq_len=LENGTH)
    logits, cache = g4.forward(params, TARGET, ids, torch.arange(PROMPT), cache, last=1)
    for t in range(PROMPT, LENGTH):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if t < LENGTH - 1:
            logits, cache = g4.forward(params, TARGET, nxt, torch.tensor([t]), cache, last=1)
    return ids


@torch.no_grad()
def teacher(params: g4.Params, ids: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The target's final hidden states `[B, L, H]`, its store layers' K/V, and its embeddings `[B, L, H]`."""
    cache = g4.init_cache(TARGET, batch=ids.shape[0], max_seq_len=LENGTH, max_chunk=LENGTH)  # ring holds all
    h, cache = hidden_states(params, TARGET, ids, torch.arange(LENGTH), cache)
    assert cache is not None
    kv = target_kv(TARGET, cache)
    return h, kv, embed(params.embed_tokens, ids, TARGET.hidden_size**0.5)


def train(params: g4.Params, ids: torch.Tensor, n: int, steps: int, lr: float, log: list) -> g4.params.Assistant:
    """Distils a random drafter on `ids`: `steps` Adam steps over random (sequence batch, position) pairs."""
    h, kv, emb = teacher(params, ids)
    a = tree_map(lambda t: t.clone().requires_grad_(t.is_floating_point()), init_assistant(ASSISTANT, seed=1))
    leaves = [t for _, t in g4.params.leaves_with_path(a) if t.requires_grad]
    opt = torch.optim.Adam(leaves, lr=lr)
    gen = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    for step in range(steps):
        rows = torch.randperm(ids.shape[0], generator=gen)[:16]
        p = int(torch.randint(PROMPT, LENGTH - n, (), generator=gen))  # the drafted position
        keys = {t: (k[rows], v[rows], pos) for t, (k, v, pos) in kv.items()}
        x, loss = torch.cat([emb[rows, p : p + 1], h[rows, p - 1 : p]], -1), 0.0
        for j in range(n):  # draft j predicts the token at p + 1 + j
            logits, nxt = draft_step(a, ASSISTANT, x, torch.tensor([p]), keys)
            loss = loss + F.cross_entropy(logits[:, 0], ids[rows, p + 1 + j])
            x = torch.cat([emb[rows, p + 1 + j : p + 2 + j], nxt], -1)  # teacher-forced token, own hidden state
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": float(loss.detach()) / n, "s": time.perf_counter() - t0})
            print(f"step {step}: loss {float(loss.detach()) / n:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return tree_map(lambda t: t.detach(), a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--train-seqs", type=int, default=512)
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    params = g4.init_params(TARGET, seed=0)
    t = time.perf_counter()
    ids = greedy_text(params, a.train_seqs, seed=0)
    print(f"training text: {a.train_seqs} x {LENGTH} tokens in {time.perf_counter() - t:.0f} s")
    log: list = []
    drafter = Drafter(ASSISTANT, train(params, ids, a.draft_tokens, a.steps, a.lr, log), a.draft_tokens)
    model = EagerModel(TARGET, params, max_context=256, ring=drafter.ring(TARGET))
    held_out = torch.randint(3, TARGET.vocab_size, (a.rounds, PROMPT), generator=torch.Generator().manual_seed(99))
    result: dict = {"args": vars(a), "train_log": log}
    for split, prompts in (("held-out prompts", held_out), ("training prompts", ids[: a.rounds, :PROMPT])):
        rows = []
        for r, prompt in enumerate(prompts.tolist()):
            runs = {}
            for name in ("plain", "draft") if r % 2 == 0 else ("draft", "plain"):
                d = drafter if name == "draft" else None
                runs[name] = generate(model, prompt, a.new_tokens, stop=(), drafter=d)
            assert runs["plain"].ids == runs["draft"].ids, "speculative greedy differs from greedy"
            g = runs["draft"]
            rows.append(
                {
                    "accepted": g.accepted,
                    "drafted": g.drafted,
                    "target_steps": g.target_steps,
                    "tokens": len(g.ids),
                    "plain_decode_s": runs["plain"].decode_s,
                    "draft_decode_s": g.decode_s,
                }
            )
        acc = sum(r["accepted"] for r in rows) / sum(r["drafted"] for r in rows)
        per_step = statistics.median((r["tokens"] - 1) / r["target_steps"] for r in rows)
        speed = [r["plain_decode_s"] / r["draft_decode_s"] for r in rows]
        print(
            f"{split}: acceptance {acc:.3f} | {per_step:.2f} tokens per target step | decode speed-up with "
            f"drafting {statistics.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f}) | greedy tokens identical"
        )
        result[split] = {"rounds": rows, "acceptance": acc, "tokens_per_step": per_step, "speedup": speed}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
