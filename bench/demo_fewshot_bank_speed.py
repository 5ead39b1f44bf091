"""DiffewS at test time: a query's time when its supports' keys and values are recomputed for
every query (`FewShotUNet.forward`) against a support bank recorded once
(`FewShotUNet.support_bank`, then `segment` per query), 1 and 5 shots, one CPU thread, random
inputs of the model's size. Writes bench/results/demo_fewshot_bank_speed.json.

    python -m bench.demo_fewshot_bank_speed [--model runs/fewshot-validation/stickers-omitted-fold2] [--queries 40]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import PROJECT_ROOT
from pipeline.fewshot.training import load_fewshot_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PROJECT_ROOT / "runs" / "fewshot-validation" / "stickers-omitted-fold2"))
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "demo_fewshot_bank_speed.json"))
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_fewshot_model(arguments.model)
    model, size = loaded.model, loaded.record["image_size"]
    generator = torch.Generator().manual_seed(0)
    results = {"model": arguments.model, "image_size": size, "queries": arguments.queries, "threads": 1, "shots": {}}
    for shots in (1, 5):
        supports = torch.randn(1, shots, 3, size, size, generator=generator)  # (1, N, 3, H, W)
        maps = torch.randn(1, shots, 3, size, size, generator=generator)
        queries = torch.randn(arguments.queries, 1, 3, size, size, generator=generator)  # one at a time
        with torch.inference_mode():
            model(queries[0], supports, maps)  # warm-up
            started = time.perf_counter()
            for query in queries:
                model(query, supports, maps)
            recomputed = (time.perf_counter() - started) / len(queries)
            started = time.perf_counter()
            bank = model.support_bank(supports, maps)
            encoding = time.perf_counter() - started
            started = time.perf_counter()
            for query in queries:
                model.segment(query, bank)
            cached = (time.perf_counter() - started) / len(queries)
        results["shots"][str(shots)] = {"recomputed_seconds_per_query": round(recomputed, 5),
                                        "cached_bank_seconds_per_query": round(cached, 5),
                                        "bank_seconds_once": round(encoding, 5),
                                        "speedup": round(recomputed / cached, 2)}
        print(json.dumps({"shots": shots, **results["shots"][str(shots)]}), flush=True)
    Path(arguments.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
