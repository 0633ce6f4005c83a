"""A trained head's card: what the head is for and how it came to be.

The card (written beside the head's weights by heads.save_head) names the target model and the
sha256 of its weights (a head only drafts well for the exact model it was trained on, and
loading checks it), the head's config and the layers it reads, the draft vocabulary's size (the
ids are in the weights file), the training data, steps, seed, commit, wall time per stage and
the acceptance measured on held-out prompts after each epoch.
"""
from __future__ import annotations

import datetime
import subprocess
from dataclasses import asdict
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the repository fastdecode runs from, or None (an installed package, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def make_card(kind: str, head, model_name: str, model_config, run: dict, train_answer_tokens: int,
              settings, result: dict, init: dict | None = None) -> dict:
    """The card of a head trained in a run: `run` is the run folder's record (run.json: settings,
    data counts, wall times), `settings` the loop's TrainSettings, `result` what loop.train returned,
    `init` the head it was fine-tuned from (its file, hash, and what its card said of its training)."""
    fixed, data = run["settings"], run["data"]
    answered = data["train_prompts"] + data["held_out_prompts"]
    dropped = data["dropped"]
    return {
        "kind": kind,
        "config": head.config(),
        "layers": list(head.layers),
        "target": {"model": model_name, "sha256": fixed["model_sha256"], "dtype": fixed["dtype"],
                   "num_layers": model_config.num_layers, "hidden_size": model_config.hidden_size,
                   "vocab_size": model_config.vocab_size},
        "draft_vocab_size": len(head.draft_ids) if hasattr(head, "draft_ids") else model_config.vocab_size,
        "data": {
            "source": data["source"], "records": data["records"], "train_prompts": data["train_prompts"],
            "held_out_prompts": data["held_out_prompts"], "train_answer_tokens": train_answer_tokens,
            "answers": "the source's own replies" if fixed.get("answers") == "dataset" else "the target's own",
            **({} if fixed.get("answers") == "dataset" else {
                "greedy_share": round(1 - data["sampled_answers"] / answered, 4),
                "sampled_share": round(data["sampled_answers"] / answered, 4), "temperature": fixed["temperature"]}),
            "max_new_tokens": fixed["max_new_tokens"], "max_prompt_tokens": fixed["max_prompt_tokens"],
            "spec_bench_dropped": {"exact": dropped.get("spec-bench exact", 0),
                                   "near": dropped.get("spec-bench near", 0)} if data["spec_bench_checked"] else None,
            "dropped": dropped,
        },
        "training": {**{k: v for k, v in asdict(settings).items() if k != "checkpoint_minutes"},
                     "precision": result["precision"], "steps": result["steps"], "tokens_per_s": result["tokens_per_s"]},
        **({"initialised_from": init} if init else {}),
        "seed": fixed["seed"],
        "commit": git_commit(),
        "wall_time_s": dict(run["wall_time_s"]),
        "acceptance": result["history"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
