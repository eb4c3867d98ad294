"""The original gpt-tinystories README's prompt, from a notebook or the shell:

    python examples/lily_needle.py runs/quickstart

Prints three sampled continuations and the beam-search one (5 beams, as the TinyStories authors used).
"""

import sys

from gpt_tinystories import UserError, load

PROMPT = "One day, a little girl named Lily found a needle in her room"

try:
    teller = load(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
except UserError as error:  # e.g. no run there yet: one line, as the CLI says it
    print(f"lily_needle.py: {error}", file=sys.stderr)
    sys.exit(2)
for story in teller.generate(PROMPT, max_new_tokens=200, temperature=0.8, top_k=50, seed=0, num_samples=3):
    print(PROMPT + story, end="\n\n")
print("Beam search:", PROMPT + teller.beam_search(PROMPT, max_new_tokens=200, num_beams=5))
