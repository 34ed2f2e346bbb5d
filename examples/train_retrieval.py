"""Train the project's small long-context retrieval model (Llama architecture, GQA, RoPE).

    python examples/train_retrieval.py --out models/retrieval-llama --max-minutes 9

Data: `tidal_compile.eval.retrieval_data` (filler language, passkey needles and multi-query
associative recall), generated on the fly from `--seed`, with a fixed token count per step.

Retrieval from scratch plateaus for thousands of steps at long lengths (attention must first
find a few answer tokens among thousands) and learns within a few hundred at short ones, so the
lengths follow a curriculum gated on accuracy: training starts at the shortest of `--lengths`
and moves to the next when the running answer-token accuracy at the current longest length
reaches `--advance-at` (half the batches are at the current longest length, the rest replay
shorter ones). The learning rate is constant after a warm-up and decays over the last
`--decay-fraction` of the run (steps or `--max-minutes`, whichever runs out first; training.json
records which ended it: only a step-bounded run is reproducible, and GPU kernels may still
reorder float sums). Saves `config.json` + sharded bf16 safetensors and `training.json`
(command, curriculum, losses, needle accuracy per length) in `--out`.
"""

from __future__ import annotations

import argparse
import json
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


class LengthCurriculum:
    """Training lengths gated on accuracy: stage s trains at `lengths[s]` half the time (always at
    stage 0) and replays the shorter lengths otherwise; it advances when the running (EMA)
    answer-token accuracy at `lengths[s]` reaches `advance_at` after at least `min_steps` steps."""

    def __init__(self, lengths: list[int], advance_at: float, min_steps: int, smoothing: float = 0.9):
        self.lengths, self.advance_at, self.min_steps, self.smoothing = sorted(lengths), advance_at, min_steps, smoothing
        self.stage, self.accuracy, self.steps_in_stage = 0, 0.0, 0

    @property
    def longest(self) -> int:
        return self.lengths[self.stage]

    def draw(self, gen: torch.Generator) -> int:
        u = torch.rand(2, generator=gen, device=gen.device).tolist()
        if self.stage == 0 or u[0] < 0.5:
            return self.longest
        return self.lengths[int(u[1] * self.stage)]

    def record(self, length: int, accuracy: float) -> bool:
        """Account one step; True when this step moved the curriculum to the next stage."""
        self.steps_in_stage += 1
        if length == self.longest:
            self.accuracy = self.smoothing * self.accuracy + (1 - self.smoothing) * accuracy
        if self.stage + 1 < len(self.lengths) and self.steps_in_stage >= self.min_steps \
                and self.accuracy >= self.advance_at:
            self.stage, self.accuracy, self.steps_in_stage = self.stage + 1, 0.0, 0
            return True
        return False


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
    predicts exactly, teacher-forced (equal to greedy decoding of the 5 tokens)."""
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
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default="64,128,256,512,1024,2048,4096",
                        help="curriculum lengths (tokens), shortest first")
    parser.add_argument("--advance-at", type=float, default=0.9,
                        help="answer-token accuracy at the current longest length that moves to the next")
    parser.add_argument("--min-stage-steps", type=int, default=50)
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--decay-fraction", type=float, default=0.15)
    parser.add_argument("--max-needles", type=int, default=32)
    parser.add_argument("--lm-weight", type=float, default=0.2,
                        help="weight of the language-model loss over all tokens beside the answer loss")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    curriculum = LengthCurriculum([int(x) for x in args.lengths.split(",")], args.advance_at, args.min_stage_steps)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args.layers, args.hidden, args.heads, args.kv_heads,
                                          2 * curriculum.lengths[-1]))
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {args.layers} layers, device {device}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    start, history, stages = time.time(), [], []
    limit = args.max_minutes * 60 or float("inf")

    def progress(step: int) -> float:
        return min(max(step / args.steps, (time.time() - start) / limit), 1.0)

    def lr_scale(step: int) -> float:
        decay = (1.0 - progress(step)) / args.decay_fraction
        return min(1.0, (step + 1) / args.warmup) * max(0.1, min(1.0, decay))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    language = data.FillerLanguage()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        length = curriculum.draw(gen)
        batch = data.training_batch(language, max(1, args.tokens_per_step // length), data.slots_for_length(length),
                                    gen, device, args.max_needles)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lm_loss, answer_loss, answer_acc = losses(model, batch)
        (args.lm_weight * lm_loss + answer_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        out_of_time = time.time() - start > limit
        logged = step % args.log_every == 0 or step == args.steps or out_of_time
        if curriculum.record(length, answer_acc.item()):
            stages.append(dict(step=step, seconds=round(time.time() - start, 1), length=curriculum.longest))
            print(f"step {step}: curriculum reaches length {curriculum.longest}", flush=True)
        if logged:
            record = dict(step=step, seconds=round(time.time() - start, 1), length=length,
                          longest=curriculum.longest, lm_loss=round(lm_loss.item(), 4),
                          answer_loss=round(answer_loss.item(), 4), answer_token_accuracy=round(answer_acc.item(), 4),
                          running_accuracy=round(curriculum.accuracy, 4), lr=schedule.get_last_lr()[0])
            history.append(record)
            print(json.dumps(record), flush=True)
        if out_of_time:
            break

    model.eval()
    accuracy = {length: needle_accuracy(model, language, length, device) for length in curriculum.lengths}
    print(f"needle accuracy (teacher-forced) per length: {accuracy}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="15MB")
    summary = dict(command="python " + " ".join(sys.argv), parameters=params, seconds=round(time.time() - start, 1),
                   steps_done=step, ended_by="time" if step < args.steps else "steps",
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, stages=stages, final=history[-1], needle_accuracy=accuracy,
                   history=history)
    (args.out / "training.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
