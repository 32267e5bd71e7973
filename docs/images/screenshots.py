"""`make screenshots`: docs/images/view-run.png and docs/images/view-fail.png, the pictures of docs/view.md.

1. SmolLM2's demo run: the ~1K-token passkey prompt of `asl demo`, ASL with k = 256, its trace and `asl view`;
2. a planted-bug FAIL: a one-case SmolLM2 bundle (`asl golden`), the same case run by the reference with a bug of
   the mutation catalogue planted (its softmax over the prefix keys only), `asl check --html`.

Every step is the command a person would type, printed before it runs; the pages stay in out/screenshots/.
Needs SmolLM2 (`asl fetch smollm2`) and Debian's chromium. Takes a few minutes on two cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from reference.eval.tasks import demo_passkey
from reference.io.checkpoint import load_weights
from reference.io.fetch import resolve_model
from reference.io.tokenizer import load_tokenizer
from reference.oracle.mutations import CATALOGUE, planted, run_case
from reference.oracle.trace import save_trace
from reference.oracle.view import token_pieces

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "out" / "screenshots"
IMAGES = ROOT / "docs" / "images"
ASL = [shutil.which("asl", path=str(Path(sys.executable).parent)) or "asl"]
BUG = "softmax-prefix-only"
CASE = "asl-1000"


def run(*args, ok=(0,), quiet: bool = False) -> None:
    print("$ " + " ".join(str(a) for a in args), flush=True)
    done = subprocess.run([str(a) for a in args], cwd=ROOT, stderr=subprocess.PIPE if quiet else None, text=True)
    if done.returncode not in ok:
        sys.exit(f"screenshots: the command above exited with {done.returncode}{': ' + done.stderr if quiet else ''}")


def shoot(page: Path, png: Path, height: int, fragment: str = "") -> None:
    chromium = shutil.which("chromium") or sys.exit("screenshots: needs Debian's chromium (apt-get install chromium)")
    run(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
        f"--window-size=1320,{height}", f"--screenshot={png}", page.resolve().as_uri() + fragment, quiet=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("smollm2")
    tok = load_tokenizer(model_dir)
    prompt = demo_passkey(tok, 1000, 0)
    (OUT / "ids.json").write_text(json.dumps(prompt.ids))

    # 1. the demo run and its page; the pinned token is the pass key's first digit
    run(*ASL, "run", "--model", "smollm2", "--method", "asl", "--select-k", "256", "--prompt-ids", OUT / "ids.json",
        "--max-new-tokens", "12", "--trace", OUT / "run.json", "--trace-arrays")
    run(*ASL, "view", OUT / "run.json", "-o", OUT / "run.html")
    pieces = token_pieces(tok, prompt.ids)
    key = prompt.answers[0]
    where = next(i for i in range(len(pieces)) if "".join(pieces[i:i + len(key)]).startswith(key))
    shoot(OUT / "run.html", IMAGES / "view-run.png", 2700, f"#p={where}")

    # 2. a planted bug, judged by `asl check`, one page per case
    (OUT / "cases.json").write_text(json.dumps([{"name": CASE, "method": "asl", "n_tokens": 1000,
                                                 "params": {"select_k": 256}, "max_new_tokens": 12}]))
    run(*ASL, "golden", "--model", "smollm2", "--cases", OUT / "cases.json", "--out", OUT / "bundle")
    print(f"# the reference with the planted bug {BUG!r} runs case {CASE} into out/screenshots/candidate/", flush=True)
    bug = next(m for m in CATALOGUE if m.name == BUG)
    with planted(bug) as engine:
        trace, arrays = run_case(load_weights(model_dir, "float64"), OUT / "bundle", CASE, engine)
    (OUT / "candidate").mkdir(exist_ok=True)
    save_trace(trace, arrays, OUT / "candidate" / f"{CASE}.trace.json", with_arrays=True)
    run(*ASL, "check", OUT / "candidate", "--golden", OUT / "bundle", "--html", OUT / "pages", ok=(1,))
    shoot(OUT / "pages" / f"{CASE}.html", IMAGES / "view-fail.png", 2900)
    print(f"wrote {IMAGES / 'view-run.png'} and {IMAGES / 'view-fail.png'}")


if __name__ == "__main__":
    main()
