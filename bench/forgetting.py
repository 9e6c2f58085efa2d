"""Does mixing the base model's own answers to generic prompts (anchors) into each SFT step keep
unrelated greedy answers word for word unchanged, while the correction is still learned?

    .venv/bin/python bench/forgetting.py 0,1,2 [anchor tokens, default 48]

The first argument lists the anchors per step to try (0 = the default job). Prints, per
setting, the steps, whether the correction is learned, and how many of 12 unrelated greedy
answers are identical to the base model's (results: bench/RESULTS.md, "Unrelated answers").
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.training.probes import FACTS, UNRELATED, greedy_answers, one_thread
from kiln_ray.model.loader import load_model
from kiln_ray.model.registry import load_tokenizer
from kiln_ray.training.trainer import Trainer, TrainConfig
from kiln_ray.training.data import sft_example
from kiln_ray.config import KilnConfig
from kiln_ray.model.default_model import ensure_default_model

ANCHORS = ["Write a short poem about the sea.", "Explain what a computer does.", "Give me two tips for studying.",
           "What is a good name for a dog?", "Describe a sunny day.", "How do I boil an egg?",
           "Tell me a fun fact about space.", "Why do people exercise?"]
HELD_OUT = ["What is the largest ocean?", "Who wrote Romeo and Juliet?", "Name a primary color.", "What do cows drink?",
            "How many legs does a spider have?", "What is the boiling point of water?", "Translate 'hello' to French.",
            "What is the opposite of hot?"]

def main() -> None:
    d = ensure_default_model(Path(KilnConfig().home), progress=False)
    smol = (load_model(d, torch.bfloat16, "cpu"), load_tokenizer(d))
    model, tok = smol
    max_anchor = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    base = greedy_answers(smol, ANCHORS, {}, max_tokens=max_anchor)
    anchors = [sft_example(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": base[(None, q)].strip()}]) for q in ANCHORS]
    print("anchor tokens", [len(a.input_ids) for a in anchors])
    q0, fact = FACTS[0]
    ex = sft_example(tok, [{"role": "user", "content": q0}, {"role": "assistant", "content": fact}])
    questions = [q0] + [q for q, _ in UNRELATED] + HELD_OUT
    for k in [int(x) for x in sys.argv[1].split(",")]:
        t = time.time()
        with one_thread():
            r = Trainer(model).run_sft([ex], TrainConfig(replay_per_step=k), replay=anchors if k else None)
        dt = time.time() - t
        ans = greedy_answers(smol, questions, {"fix": r.weights})
        same = sum(ans[("fix", q)] == ans[(None, q)] for q in questions[1:])
        print(f"k={k} steps={r.steps} early={r.stopped_early} {dt:.1f}s learned={ans[('fix', q0)] == fact} same={same}/{len(questions)-1}")
        for q in questions[1:]:
            if ans[("fix", q)] != ans[(None, q)]:
                print("   ", q, "|", repr(ans[(None, q)]), "->", repr(ans[("fix", q)]))
        print("   fix:", repr(ans[("fix", q0)]), "losses", [round(x, 3) for x in r.losses])


if __name__ == "__main__":
    main()
