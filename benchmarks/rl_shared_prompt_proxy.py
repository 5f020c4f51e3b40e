"""What running each prompt once for its k samples would save in an RL step's scoring and update (a proxy).

    python benchmarks/rl_shared_prompt_proxy.py          # SmolLM2, ~3 min on one CPU thread

lightning-pref shares a prompt's prefill between its ``k`` samples in generation, but scores the rollout (the
reference forward) and trains on it (the policy's forward and backward) as ``B * k`` packed sequences, each with
its own copy of its prompt: ``layout.pack`` shares a prompt between two sequences only (a preference pair). This
script times those two passes, exactly as ``PolicyGradientModule.experience`` and ``micro_step`` run them
(``sequence_batch``, ``reference.per_token``, ``policy.token_logps`` with entropy, backward), on

- ``packed``: the rollout as lightning-pref lays it out today, ``B * k`` sequences ``(prompt, completion)``;
- ``proxy``: ``B`` sequences ``(prompt, completion_1 + ... + completion_k)``: the tokens a layout with each prompt
  once per group runs (the same count), each completion attending to the ones before it as well (a little more
  attention than such a layout would do, so the proxy understates the saving).

Same prompts (SmolLM2's chat template over HH prompts, as ``rl_step.py``), 32-token completions of random tokens,
one torch thread; CPU time, median of alternating repetitions. Writes ``results/rl_shared_prompt_proxy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (B)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--completion-tokens", type=int, default=32)
    p.add_argument("--groups", type=int, default=3, help="steps (prompt groups) timed per repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)

    import rl_step
    import torch
    from rl_workers import set_threads
    from transformers import AutoTokenizer

    from lightning_pref.rl.module import PolicyGradientModule

    set_threads()
    model_dir = rl_step.smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = rl_step.hh_prompts(args.prompts * args.groups, tokenizer)
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in messages]
    module = PolicyGradientModule(policy=model_dir, judge={"class_path": "function", "init_args": {
        "fn": "lightning_pref.judges.rules:quiet_letters"}}, estimator={"class_path": "grpo"},
        samples_per_prompt=args.k)
    module.configure_model()
    rng = random.Random(0)
    vocab = len(tokenizer)
    layouts = {"packed": [], "proxy": []}
    for g in range(args.groups):
        group = prompts[g * args.prompts:(g + 1) * args.prompts]
        completions = [[[rng.randrange(vocab) for _ in range(args.completion_tokens)] for _ in range(args.k)]
                       for _ in group]
        layouts["packed"].append([(p, c) for p, cs in zip(group, completions, strict=True) for c in cs])
        layouts["proxy"].append([(p, sum(cs, [])) for p, cs in zip(group, completions, strict=True)])

    def timed(sequences) -> dict[str, float]:
        out = {}
        start = time.process_time()
        batch = module.sequence_batch(sequences, "auto")
        with torch.no_grad():
            module.reference.per_token(module.policy, batch, 1.0)
        out["scoring"] = time.process_time() - start
        start = time.process_time()
        batch = module.sequence_batch(sequences, "auto")
        current = module.policy.token_logps(batch, 1.0, entropy=True)
        current.logps.sum().backward()  # the entropy is a metric in training, not in the loss
        module.policy.zero_grad(set_to_none=True)
        out["update_forward_backward"] = time.process_time() - start
        out["tokens"] = sum(len(a) + len(b) for a, b in sequences)
        return out

    timed(layouts["packed"][0])  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"packed": [], "proxy": []}
    for rep in range(args.repeats):
        for name in ("packed", "proxy") if rep % 2 == 0 else ("proxy", "packed"):
            parts = [timed(s) for s in layouts[name]]
            runs[name].append({key: sum(x[key] for x in parts) / len(parts) for key in parts[0]})
    summary = {name: {key: statistics.median(r[key] for r in reps) for key in reps[0]} for name, reps in runs.items()}
    ratios = {key: statistics.median(a[key] / b[key] for a, b in zip(runs["packed"], runs["proxy"], strict=True))
              for key in ("scoring", "update_forward_backward", "tokens")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "summary": summary, "packed_over_proxy": ratios, "runs": runs}
    (out / "rl_shared_prompt_proxy.json").write_text(json.dumps(result, indent=1))
    lines = ["# rl_shared_prompt_proxy", "",
             f"SmolLM2-135M, fp32, one thread: {args.prompts} HH prompts x k = {args.k} completions of "
             f"{args.completion_tokens} tokens per step, {args.groups} steps, {args.repeats} alternating repetitions "
             "(medians). CPU seconds per step.", "",
             "| layout | tokens | scoring (reference forward) | update (policy forward + backward) |",
             "|---|---:|---:|---:|"]
    for name in ("packed", "proxy"):
        s = summary[name]
        lines.append(f"| {name} | {s['tokens']:.0f} | {s['scoring']:.2f} | {s['update_forward_backward']:.2f} |")
    lines += ["", f"packed / proxy: tokens {ratios['tokens']:.2f}x, scoring {ratios['scoring']:.2f}x, update "
                  f"{ratios['update_forward_backward']:.2f}x.", ""]
    (out / "rl_shared_prompt_proxy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
