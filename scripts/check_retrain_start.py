"""Does a retrain start exactly like the shipped run? Runs `train_bundled_model` (seed 0) on this machine until 30 steps of
the answer stage, then compares the logged losses of the codec, the vision stage and the answers with the shipped
`mask_codec_history.json` and `history.json`, digit for digit. Usage: python scripts/check_retrain_start.py [THREADS=2]
(a few minutes on 2 idle cores: the codec and the whole vision stage run first)."""
import json
import sys
import tempfile
from pathlib import Path

import torch

from paligemma_edu.bundled import bundled_model_path, train_bundled_model


class Stop(Exception): pass


def main(threads: int = 2):
    torch.set_num_threads(threads)
    shipped = json.loads((bundled_model_path() / "history.json").read_text())
    codec = json.loads((bundled_model_path() / "mask_codec_history.json").read_text())["history"]
    got = {"codec": [], "vision": [], "answers": []}

    def on_log(rec):
        stage = rec.get("stage", "answers")
        got[stage].append((rec["step"], rec["loss"]))
        if stage == "answers" and rec["step"] >= 30: raise Stop

    try: train_bundled_model(Path(tempfile.mkdtemp()) / "m", on_log=on_log, progress=False, eval_per_task=0)
    except Stop: pass
    pairs_of = lambda records: [(r["step"], r["loss"]) for r in records]
    want = {"codec": pairs_of(codec), "vision": pairs_of(shipped["vision_history"]), "answers": pairs_of(shipped["history"])}
    for stage, pairs in got.items():
        same = sum(p == w for p, w in zip(pairs, want[stage]))
        print(f"{stage}: {same} of {len(pairs)} logged losses equal the shipped run's exactly")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
