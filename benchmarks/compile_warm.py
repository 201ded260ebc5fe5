"""Time the first generate(..., compile=True) call of a process on the bundled model, wall and CPU time, with the
compile cache's hit counters: run it twice with the same PALIGEMMA_EDU_CACHE (and thread count); the second process
finds the compiled step in the cache.

    PALIGEMMA_EDU_CACHE=/tmp/pg-cache OMP_NUM_THREADS=2 python benchmarks/compile_warm.py   # first: compiles
    PALIGEMMA_EDU_CACHE=/tmp/pg-cache OMP_NUM_THREADS=2 python benchmarks/compile_warm.py   # second: cache hits
"""
import json
import time

t0 = time.perf_counter()
from paligemma_edu.bundled import load_bundled_model  # noqa: E402
from paligemma_edu.shapes import make_scene  # noqa: E402


def main():
    from torch._dynamo.utils import counters
    model, processor = load_bundled_model()
    inp = processor(images=[make_scene(3)[0]], text=["caption en"])
    args = [inp[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")]
    t1, c1 = time.perf_counter(), time.process_time()
    model.generate(*args, max_new_tokens=8, compile=True)
    t2, c2 = time.perf_counter(), time.process_time()
    model.generate(*args, max_new_tokens=8, compile=True)
    t3 = time.perf_counter()
    print(json.dumps(dict(import_and_load_s=round(t1 - t0, 1), first_call_wall_s=round(t2 - t1, 1),
                          first_call_cpu_s=round(c2 - c1, 1), second_call_wall_s=round(t3 - t2, 2),
                          fxgraph_cache_hit=counters["inductor"]["fxgraph_cache_hit"],
                          autograd_cache_hit=counters["aot_autograd"]["autograd_cache_hit"])))


if __name__ == "__main__":
    main()
