"""Does the passkey prompt's wording move ASL's criterion? The numbers behind docs/evaluation.md.

    python benchmarks/passkey_wording.py                        # SmolLM2, 1000 and 2000 tokens, seeds 0-2
    python benchmarks/passkey_wording.py --lengths 1000 --seeds 0

For each wording of the text before the haystack (the demo's `DEMO_PASSKEY_INTRO`,
InfiniteBench's `PASSKEY_INTRO`), each length and seed, runs ASL's prefill on the
reference (float32, NumPy, the pass key at depth 0.5, chat template) with the
SmolLM2 setting (`SMOLLM2_PARAMS`: tau 0.3, L_min 10, L_obs 8, w 32, kernel 7,
k 256) and prints the prompt's length, the selection layer (or "never") and the
smallest ratio from L_min + 1 on, with its layer. About 3 s a prompt at 1K tokens
on 2 cores.
"""

from __future__ import annotations

import argparse

from reference.asl.engine import as_engine
from reference.asl.methods import run_prefill
from reference.asl.params import SMOLLM2_PARAMS
from reference.eval.tasks import DEMO_DEPTH, DEMO_PASSKEY_INTRO, PASSKEY_INTRO, passkey
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.io.tokenizer import load_tokenizer

WORDINGS = {"demo": DEMO_PASSKEY_INTRO, "infinitebench": PASSKEY_INTRO}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="checkpoint alias or directory (default smollm2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000], help="prompt lengths in tokens")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pass-key seeds")
    args = ap.parse_args(argv)
    model_dir = resolve_model(args.model)
    engine, tok, P = as_engine(load_weights(model_dir)), load_tokenizer(model_dir), SMOLLM2_PARAMS
    print(f"{args.model}, float32, reference on NumPy; {P}")
    print(f"{'wording':<14} {'tokens':>6} {'seed':>4} {'selection layer':>15} {'smallest ratio (layer)':>23}")
    for wording, intro in WORDINGS.items():
        for n in args.lengths:
            for seed in args.seeds:
                ids = passkey(tok, n, seed, depth=DEMO_DEPTH, intro=intro).ids
                result = run_prefill(engine, ids, "asl", P)
                ratios = [(rec.ratio, rec.layer) for rec in result.layers
                          if rec.ratio is not None and rec.layer > P.l_min]  # the ratio at L_min is 1 by definition
                low, at = min(ratios)
                layer = "never" if result.select_layer is None else str(result.select_layer)
                print(f"{wording:<14} {len(ids):>6} {seed:>4} {layer:>15} {low:>16.3f} ({at:>2})", flush=True)


if __name__ == "__main__":
    main()
