"""GPU check of the decode engine (for a machine with CUDA; about a minute): the compiled decode step (CUDA graphs)
gives eager decoding's greedy tokens, a seeded request samples the same tokens alone or beside others, and the
compile time and per-step times of both.

    python benchmarks/engine_gpu_check.py [--preset 8M] [--max-batch 16]

Then the tables: `python benchmarks/generate_throughput.py --device cuda` and
`python benchmarks/serve_load.py --device cuda --compile on --presets 8M 28M --clients 1 16 64 --seconds 5`.
"""

import argparse
import time

import torch

from gpt_tinystories.config import ModelConfig
from gpt_tinystories.engine import Engine, Sampling, measure_compile
from gpt_tinystories.model import GPT


def run(engine: Engine, prompts: list[list[int]], sampling: Sampling, seeds: list[int | None]) -> list[list[int]]:
    sequences = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        generator = None if seed is None else torch.Generator("cuda").manual_seed(seed)
        sequences.append(engine.add(prompt, 100, sampling, generator=generator))
    while engine.busy:
        engine.step()
    return [s.generated for s in sequences]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8M")
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(args.preset, 4096)).cuda().eval()
    prompts = torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, preset {args.preset}")
    eager = Engine(model, args.max_batch)
    compiled = Engine(model, args.max_batch)
    print(measure_compile(compiled, force=True))
    greedy = Sampling(temperature=0)
    same = run(eager, prompts, greedy, [None] * 8) == run(compiled, prompts, greedy, [None] * 8)
    print(f"greedy tokens, compiled (CUDA graphs) vs eager, 8 prompts x 100 tokens: {'same' if same else 'DIFFERENT'}")
    sampling = Sampling(0.9, top_k=50)
    together = run(compiled, prompts, sampling, list(range(8)))
    alone = [run(compiled, [p], sampling, [i])[0] for i, p in enumerate(prompts)]
    print(f"seeded sampling, 8 requests together vs each alone: {'same' if together == alone else 'DIFFERENT'}")
    for name, engine in (("eager", eager), ("compiled", compiled)):
        started = time.perf_counter()
        tokens = sum(map(len, run(engine, prompts * (args.max_batch // 8 or 1), greedy, [None] * len(prompts)
                                  * (args.max_batch // 8 or 1))))  # fmt: skip
        torch.cuda.synchronize()
        print(f"{name}: {tokens / (time.perf_counter() - started):,.0f} tokens/s at batch {args.max_batch}")


if __name__ == "__main__":
    main()
