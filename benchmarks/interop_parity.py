"""Max |logits difference| between transformers and moekit for every supported architecture.

    python benchmarks/interop_parity.py      (needs the dev extra: transformers)

Tiny random models built with transformers' own classes (tests/hf_tiny.py), saved, loaded with
moekit.from_pretrained, then exported back and reloaded by transformers; fp32.
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hf_tiny import BUILDERS, SEQ, VOCAB, build  # noqa: E402

import moekit  # noqa: E402


@torch.no_grad()
def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    for arch in BUILDERS:
        ref = build(arch).eval()
        ids = torch.randint(0, VOCAB, (2, SEQ))
        with tempfile.TemporaryDirectory() as hf, tempfile.TemporaryDirectory() as out:
            ref.save_pretrained(hf)
            model = moekit.from_pretrained(hf)
            got = model(ids).logits
            load = (ref(input_ids=ids).logits - got).abs().max().item()
            model.save_pretrained(out)
            back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            export = (back(input_ids=ids).logits - got).abs().max().item()
        print(f"{arch:<18} load {load:.1e}   export -> transformers {export:.1e}")


if __name__ == "__main__":
    main()
