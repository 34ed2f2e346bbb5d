"""Train the project's small long-context retrieval model (Llama architecture, GQA, RoPE).

    python examples/train_retrieval.py --out models/retrieval-llama --steps 3000

Data: `tidal_compile.eval.retrieval_data` (filler language, passkey needles, multi-query
associative recall, and a copy task), generated on the fly from `--seed`; lengths drawn per
step from `--lengths` with a fixed token count per step. Retrieval among many needles plateaus
for thousands of steps from scratch, retrieval of one needle does not: training starts with one
needle per sequence at short lengths (`--warm-fraction`, `--warm-lengths`), then the needle
limit grows to `--max-needles` (`--ramp-fraction`). The same seed gives the same data, init and
schedule (GPU kernels may still reorder float sums). `--max-minutes` bounds the wall time: the
learning-rate schedule then follows whichever of steps and time runs out first, and
training.json records which one ended the run (only a step-bounded run is reproducible). Saves `config.json` + `model.safetensors`
(bf16) and `training.json` (command, losses, needle accuracy per length) in `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tidal_compile.eval import retrieval_data as data


def model_config(layers: int, hidden: int, heads: int, kv_heads: int, max_length: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=data.VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_length,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=data.BOS, eos_token_id=data.EOS,
        pad_token_id=data.PAD)


def losses(model: LlamaForCausalLM, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(language-model loss over all tokens, loss over answer tokens, answer-token accuracy)."""
    logits = model(batch.tokens[:, :-1]).logits.float()
    target = batch.tokens[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    answer = batch.answer_mask[:, 1:]
    correct = (logits.argmax(-1) == target)[answer].float().mean()
    return per_token.mean(), per_token[answer].mean(), correct


@torch.no_grad()
def needle_accuracy(model: LlamaForCausalLM, language: data.FillerLanguage, length: int, device: torch.device,
                    cases: int = 64) -> float:
    """Share of single-needle prompts (depths spread over [0, 1]) whose 5 answer tokens the model
    predicts exactly, teacher-forced (equal to greedy decoding of the 4 tokens)."""
    gen = torch.Generator(device=device).manual_seed(99)
    hits = 0
    for i in range(cases // 8):
        prompt, answer = data.needle_batch(language, 8, length, i / max(cases // 8 - 1, 1), gen, device)
        full = torch.cat([prompt, answer], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(full[:, :-1]).logits[:, -data.VALUE_TOKENS:]
        hits += int((logits.argmax(-1) == answer).all(dim=1).sum())
    return hits / (cases // 8 * 8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="training lengths (tokens), drawn uniformly")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warm-fraction", type=float, default=0.25,
                        help="first share of training: one needle per sequence, --warm-lengths only")
    parser.add_argument("--ramp-fraction", type=float, default=0.6,
                        help="the needle count limit grows from 1 to --max-needles until this share of training")
    parser.add_argument("--max-needles", type=int, default=32)
    parser.add_argument("--repeat-share", type=float, default=0.2,
                        help="share of copy-task batches (`retrieval_data.training_batch`)")
    parser.add_argument("--lm-weight", type=float, default=0.3,
                        help="weight of the filler language-model loss beside the answer loss")
    parser.add_argument("--warm-lengths", default="512", help="lengths during the warm-up phase")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    warm_lengths = [int(x) for x in args.warm_lengths.split(",")]
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args.layers, args.hidden, args.heads, args.kv_heads, max(lengths) * 2))
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {args.layers} layers, device {device}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    start, history = time.time(), []
    limit = args.max_minutes * 60 or float("inf")

    def progress(step: int) -> float:
        return min(max(step / args.steps, (time.time() - start) / limit), 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * progress(s)))))
    language = data.FillerLanguage()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        done = progress(step)
        pool = warm_lengths if done < args.warm_fraction else lengths
        length = pool[int(torch.randint(len(pool), (1,), generator=gen, device=device))]
        ramp = (done - args.warm_fraction) / max(args.ramp_fraction - args.warm_fraction, 1e-9)
        max_needles = 1 + round((args.max_needles - 1) * min(max(ramp, 0.0), 1.0))
        batch = data.training_batch(language, max(1, args.tokens_per_step // length), data.slots_for_length(length),
                                    gen, device, args.repeat_share, max_needles)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lm_loss, answer_loss, answer_acc = losses(model, batch)
        (args.lm_weight * lm_loss + answer_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        out_of_time = time.time() - start > limit
        if step % args.log_every == 0 or step == args.steps or out_of_time:
            record = dict(step=step, seconds=round(time.time() - start, 1), length=length, max_needles=max_needles,
                          lm_loss=lm_loss.item(), answer_loss=answer_loss.item(),
                          answer_token_accuracy=answer_acc.item())
            history.append(record)
            print(json.dumps(record), flush=True)
        if out_of_time:
            break

    model.eval()
    accuracy = {length: needle_accuracy(model, language, length, device) for length in lengths}
    print(f"needle accuracy (teacher-forced) per length: {accuracy}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="15MB")
    summary = dict(command="python " + " ".join(sys.argv), parameters=params, seconds=round(time.time() - start, 1),
                   steps_done=step, ended_by="time" if step < args.steps else "steps",
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, final=history[-1], needle_accuracy=accuracy, history=history)
    (args.out / "training.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
