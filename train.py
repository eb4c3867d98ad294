"""The original gpt-tinystories entry point, now running on our trainer:

    python train.py --cfg_param {1M,8M,28M}  [any `gpt-tinystories train` flag]

As in the original: TinyStories from the Hugging Face hub and the GPT-2 tokenizer unless told otherwise.
"28M" is the TinyStories paper's 28M (d=512); the original repo's "28M" config, which really had hidden
size 1024 and 152M parameters, is `--cfg_param 28M-seed`.
"""

import argparse
import sys
from pathlib import Path

try:
    from gpt_tinystories.cli import main
except ImportError:  # run from a clone without installing: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from gpt_tinystories.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg_param", required=True, help="model size: 1M, 8M or 28M (or any preset)")
    args, rest = parser.parse_known_args()
    # Later flags win in argparse, so anything in `rest` (e.g. --tokenizer bpe-4096) overrides these defaults.
    sys.exit(main(["train", "--preset", args.cfg_param, "--tokenizer", "gpt2", *rest]))
