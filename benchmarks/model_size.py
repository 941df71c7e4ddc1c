"""Weight and KV-cache memory of a PoseLLM preset per deployment precision, and which Jetson modules hold it.

Parameter counts come from the model itself, built on PyTorch's meta device (shapes only, no memory), so the table
follows the preset's real shapes. Bytes per weight by precision (the graphs this toolkit writes, as TensorRT runs
them on a Jetson: fp16 activations except fp32):

- fp32 / fp16: 4 / 2 bytes everywhere.
- int8 (calibrate): vision W8A8 and decoder weight-only int8 per output channel (one fp16 scale per column).
- int8wo / int4 (quantize): decoder linear layers block-wise int8 / int4 with one fp16 scale per `block` input
  features; lm_head int8 (quantize's default `--lm-head-bits 8`: per output channel in int4); the vision graph
  stays fp16.
Norm weights, biases, positional and class embeddings stay in the activation dtype. The embedding table is the
runtime's memory-mapped .npy (fp16, fp32 for fp32). The KV cache is what the runtime keeps for `persons` persons:
each person's prefix (prompt tokens + image tokens) once, then persons × 17 rows of suffix + 13 answer tokens.
Activations, engine workspace and the CUDA/TensorRT context are not counted; `reserve_gb` stands for them and the OS.

`python -m benchmarks.model_size [--preset posellm-7b] [--persons 4] [--suffix-tokens 48]` prints the README table.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from posellm.config import PoseLLMConfig, preset

JETSONS = {"Orin Nano 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 32GB": 32, "AGX Orin 64GB": 64}
PRECISIONS = ("fp32", "fp16", "int8", "int8wo", "int4")
GIB = 1024 ** 3


@dataclass(frozen=True)
class ParamCounts:
    vision_linear: int  # Linear/Conv weights of the ViT and the connector (quantized in W8A8)
    vision_other: int
    decoder_linear: int  # q/k/v/o, gate/up/down of every layer
    decoder_other: int  # RMSNorm weights
    lm_head: int
    embedding: int  # the token table (a runtime .npy, not a graph weight)
    decoder_columns: int  # output features of all decoder linear layers and lm_head (per-channel scales)


def param_counts(cfg: PoseLLMConfig) -> ParamCounts:
    import torch

    from posellm.model import PoseLLM
    with torch.device("meta"):
        model = PoseLLM(cfg)
    counts = dict.fromkeys(("vision_linear", "vision_other", "decoder_linear", "decoder_other", "lm_head",
                            "embedding", "decoder_columns"), 0)
    for name, module in model.named_modules():
        if name.startswith("llm.") and isinstance(module, torch.nn.Linear):
            counts["decoder_columns"] += module.out_features
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            linear = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pname == "weight"
            if full.startswith("llm.lm_head"):
                key = "lm_head"
            elif "embed_tokens" in full:
                key = "embedding"
            elif full.startswith("llm."):
                key = "decoder_linear" if linear else "decoder_other"
            else:
                key = "vision_linear" if linear else "vision_other"
            counts[key] += p.numel()
    return ParamCounts(**counts)


def weight_bytes(p: ParamCounts, precision: str, block: int = 64) -> dict[str, float]:
    """Bytes of vision graph, decoder graph and embedding table for one precision (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {list(PRECISIONS)}")
    act = 4 if precision == "fp32" else 2
    linear = p.decoder_linear + p.lm_head
    if precision in ("fp32", "fp16"):
        vision = (p.vision_linear + p.vision_other) * act
        decoder = (linear + p.decoder_other) * act
    elif precision == "int8":
        vision = p.vision_linear * 1 + p.vision_other * act  # + per-channel scales: negligible
        decoder = linear * 1 + p.decoder_other * act + p.decoder_columns * 2
    else:
        bits = 4 if precision == "int4" else 8
        vision = (p.vision_linear + p.vision_other) * act
        lm_head = p.lm_head * (1 if bits == 4 else 1 + 2 / block)  # int4: per-channel int8 (scales negligible)
        decoder = p.decoder_linear * (bits / 8 + 2 / block) + lm_head + p.decoder_other * act
    return {"vision": vision, "decoder": decoder, "embedding": p.embedding * act}


def kv_cache_bytes(cfg: PoseLLMConfig, persons: int, suffix_tokens: int, precision: str, keypoints: int = 17,
                   answer_tokens: int = 13, prompt_tokens: int = 4) -> float:
    c = cfg.llm
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (4 if precision == "fp32" else 2)
    prefix = persons * (prompt_tokens + cfg.num_patches)
    rows = persons * keypoints * (suffix_tokens + answer_tokens)
    return per_token * (prefix + rows)


def size_table(preset_name: str = "posellm-7b", persons: int = 4, suffix_tokens: int = 48, block: int = 64,
               reserve_gb: float = 2.0) -> list[dict]:
    cfg = preset(preset_name)
    p = param_counts(cfg)
    rows = []
    for precision in PRECISIONS:
        b = weight_bytes(p, precision, block)
        kv = kv_cache_bytes(cfg, persons, suffix_tokens, precision)
        total = sum(b.values()) + kv
        rows.append({"precision": precision, **{k: v / GIB for k, v in b.items()}, "kv_cache": kv / GIB,
                     "total": total / GIB,
                     "fits": {name: total / GIB <= gb - reserve_gb for name, gb in JETSONS.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["precision", "vision GiB", "decoder GiB", "embedding GiB", "KV cache GiB", "total GiB", *JETSONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["precision"], *(f"{r[k]:.2f}" for k in ("vision", "decoder", "embedding", "kv_cache", "total")),
                 *("yes" if r["fits"][j] else "no" for j in JETSONS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="posellm-7b")
    ap.add_argument("--persons", type=int, default=4, help="persons whose KV cache is held at once")
    ap.add_argument("--suffix-tokens", type=int, default=48,
                    help="tokens of the longest keypoint prompt (the rows' KV length is this + 13)")
    ap.add_argument("--block", type=int, default=64, help="int4/int8wo block size (one fp16 scale per block)")
    ap.add_argument("--reserve-gb", type=float, default=2.0,
                    help="memory left to the OS, CUDA/TensorRT context and activations")
    a = ap.parse_args(argv)
    rows = size_table(a.preset, a.persons, a.suffix_tokens, a.block, a.reserve_gb)
    print(markdown(rows))
    fp16 = next(r for r in rows if r["precision"] == "fp16")["decoder"]
    for r in rows:
        print(f"{r['precision']}: decoder {r['decoder'] / fp16:.3f}x fp16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
