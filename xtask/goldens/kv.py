#!/usr/bin/env python3
"""Golden generator for cachet-kv: generation with every transformers KV cache type.

Loads the committed tiny checkpoints `tests/fixtures/{llama,mistral,qwen2}` (made by
`xtask/goldens/llama.py`) with `from_pretrained` and records, under `tests/fixtures/kv/`:

* `greedy.json`  greedy `generate` tokens (do_sample=False, EOS stopping disabled, new tokens
  only) per model, prompt set and `cache_implementation` (+ the exact `cache_config` passed),
  with the smallest top-1/top-2 logit margin over all steps and rows.
* `beam.json`    beam search (num_beams=3, num_return_sequences 3 and 1, length_penalty and
  early_stopping left at their defaults) tokens and `sequences_scores`.
* `quant_vectors.safetensors`  quantize -> dequantize of a fixed K tensor through transformers'
  own `QuantoQuantizedLayer` / `HQQQuantizedLayer._quantize/_dequantize`, with the codes,
  scales and shifts/zeros, so the Rust quantizers can be checked value by value.
* `sink.json`    SinkCache greedy tokens from transformers 4.52 (the last release with it).

Two environments (the sink cache was removed after 4.52):

    main venv (target/goldens-venv): requirements.txt      -> everything but sink
    sink venv (target/goldens-venv-sink): requirements-sink.txt -> sink.json only

`cargo xtask goldens` creates both and runs this script in each.

Run from the workspace root: `python xtask/goldens/kv.py`; the script picks its part from the
installed transformers version. Outputs are deterministic (CPU, f32, deterministic algorithms).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import safetensors
import torch
from goldens_lib.safetensors_writer import save_file
import transformers

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

PAD_ID = 0
NEW_TOKENS = 12
MODELS = ("llama", "mistral", "qwen2")
# Quantization group size for the generation goldens: it must divide head_dim (16 for llama and
# qwen2, 32 for mistral) so that transformers' quanto axis 0 / hqq axis 1 groups are per-token
# groups of consecutive channels (with a larger group, transformers' groups straddle tokens).
GOLDEN_GROUP = 16
TV = tuple(int(x) for x in transformers.__version__.split(".")[:2])


def log(msg: str) -> None:
    print(msg, flush=True)


def root() -> Path:
    r = Path.cwd()
    if not (r / "Cargo.toml").exists() or not (r / "xtask").is_dir():
        sys.exit("run from the workspace root")
    return r


def fixture_prompt(fx: Path) -> list[int]:
    with safetensors.safe_open(str(fx / "reference.safetensors"), "pt") as f:
        return f.get_tensor("g.prompt_ids")[0].tolist()


def fixture_greedy(fx: Path) -> list[int]:
    with safetensors.safe_open(str(fx / "reference.safetensors"), "pt") as f:
        return f.get_tensor("g.tokens")[0].tolist()


def load(fx: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(fx))
    if TV < (5, 0):
        # 4.x reads `rope_theta` at the top level; the 5.x checkpoints keep it in `rope_parameters`.
        rp = json.loads((fx / "config.json").read_text()).get("rope_parameters") or {}
        if rp:
            assert rp.get("rope_type", "default") == "default", rp
            config.rope_theta = rp["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(
        str(fx), config=config, dtype=torch.float32, attn_implementation="eager"
    ) if TV >= (5, 0) else AutoModelForCausalLM.from_pretrained(
        str(fx), config=config, torch_dtype=torch.float32, attn_implementation="eager"
    )
    # EOS stopping off. (4.52 replaces an explicit `eos_token_id=None` of the GenerationConfig
    # passed to `generate` by the model's default, so it must be cleared on the model itself.)
    model.generation_config.eos_token_id = None
    return model.eval()


def prompt_sets(fx: Path) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """`single`: the fixture's [1, 5] greedy prompt. `batch`: a 2-row left-padded batch."""
    p = fixture_prompt(fx)
    single = ([p], [[1] * len(p)])
    batch_rows = [[PAD_ID, PAD_ID, 123, 98, 213], p]
    batch_mask = [[0, 0, 1, 1, 1], [1] * len(p)]
    return {"single": single, "batch": (batch_rows, batch_mask)}


def gen_config(**kw):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        **kw,
    )


@torch.no_grad()
def generate(model, rows, mask, past_key_values=None, **kw):
    ids = torch.tensor(rows, dtype=torch.long)
    am = torch.tensor(mask, dtype=torch.long)
    gc = gen_config(**kw)
    extra = {} if past_key_values is None else {"past_key_values": past_key_values}
    out = model.generate(
        ids,
        attention_mask=am,
        generation_config=gc,
        return_dict_in_generate=True,
        output_scores=True,
        **extra,
    )
    new = out.sequences[:, ids.shape[1] :].tolist()
    margin = float("inf")
    for s in out.scores:
        top = torch.topk(s.float(), 2, dim=-1).values
        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
    return new, margin, out


def quantized_configs() -> list[dict]:
    cfgs = []
    # transformers' recommended axes (guide): 0 for quanto, 1 for hqq: per-token groups.
    for backend, axis in (("quanto", 0), ("hqq", 1)):
        for nbits in (4, 2):
            for residual in (4, 128):
                cfgs.append(
                    {
                        "backend": backend,
                        "nbits": nbits,
                        "axis_key": axis,
                        "axis_value": axis,
                        # hqq packs 2-bit codes 4 groups to a byte row: the group count must be a
                        # multiple of 4, which groups of 8 channels guarantee (head_dim 16 or 32).
                        "q_group_size": 8 if (backend, nbits) == ("hqq", 2) else GOLDEN_GROUP,
                        "residual_length": residual,
                    }
                )
    return cfgs


def use_pure_pytorch_quanto_unpack() -> None:
    """optimum-quanto's CPU `unpack` JIT-compiles a C++ extension (needs ninja and a compiler);
    its own pure-PyTorch kernel (`quanto::unpack` "default") gives the same bits. Use that."""
    from optimum.quanto.tensor.packed import PackedTensor

    def unpack(self):
        packed, bits = self._data, self._bits
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)[: self.shape[0]]

    PackedTensor.unpack = unpack


def main_523(r: Path) -> None:
    out_dir = r / "tests" / "fixtures" / "kv"
    out_dir.mkdir(parents=True, exist_ok=True)
    import hqq
    import optimum.quanto

    use_pure_pytorch_quanto_unpack()

    meta = {
        "generator": "xtask/goldens/kv.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimum-quanto": optimum.quanto.__version__,
        "hqq": getattr(hqq, "__version__", "0.2.8.post1"),
        "new_tokens": NEW_TOKENS,
        "pad_token_id": PAD_ID,
        "greedy": "generate(do_sample=False), eos stopping disabled, new tokens only",
    }
    greedy_cases = []
    beam_cases = []
    for name in MODELS:
        fx = r / "tests" / "fixtures" / name
        model = load(fx)
        reference = fixture_greedy(fx)
        for set_name, (rows, mask) in prompt_sets(fx).items():
            impls: list[tuple[str, dict | None]] = [("dynamic", None), ("static", None), ("sliding_window", None)]
            if getattr(model.config, "sliding_window", None) is None:
                # transformers 5.23: "`QuantizedCache` is only supported for models with only full
                # attention layers" (Mistral's layers are sliding_attention): no quantized goldens.
                impls += [("quantized", c) for c in quantized_configs()]
            for impl, cfg in impls:
                kw = {"cache_implementation": impl}
                if cfg is not None:
                    kw["cache_config"] = dict(cfg)
                toks, margin, _ = generate(model, rows, mask, **kw)
                if impl == "dynamic" and set_name == "single" and toks[0] != reference:
                    raise RuntimeError(f"{name}: dynamic greedy differs from the fixture's g.tokens")
                greedy_cases.append(
                    {
                        "model": name,
                        "prompts": set_name,
                        "input_ids": rows,
                        "attention_mask": mask,
                        "cache_implementation": impl,
                        "cache_config": cfg,
                        "tokens": toks,
                        "min_margin": round(margin, 6),
                    }
                )
                log(f"{name:8} {set_name:6} {impl:15} {json.dumps(cfg) if cfg else '':110} {toks} m={margin:.4f}")
            for nrs in (3, 1):
                toks, _, out = generate(
                    model, rows, mask, cache_implementation="dynamic", num_beams=3, num_return_sequences=nrs,
                    output_logits=False,
                )
                beam_cases.append(
                    {
                        "model": name,
                        "prompts": set_name,
                        "input_ids": rows,
                        "attention_mask": mask,
                        "num_beams": 3,
                        "num_return_sequences": nrs,
                        "length_penalty": 1.0,
                        "early_stopping": False,
                        "tokens": toks,
                        "sequences_scores": [float(x) for x in out.sequences_scores.tolist()],
                    }
                )
                log(f"{name:8} {set_name:6} beam nrs={nrs} {toks} {out.sequences_scores.tolist()}")
    (out_dir / "greedy.json").write_text(json.dumps({"meta": meta, "cases": greedy_cases}, indent=1) + "\n")
    (out_dir / "beam.json").write_text(json.dumps({"meta": meta, "cases": beam_cases}, indent=1) + "\n")
    write_quant_vectors(out_dir, meta)


def write_quant_vectors(out_dir: Path, meta: dict) -> None:
    """Quantize -> dequantize a fixed [1, 2, 8, 16] tensor with transformers' layer classes."""
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    gen = torch.Generator().manual_seed(1234)
    k = torch.randn((1, 2, 8, 16), generator=gen) * 1.5 + 0.25
    tensors: dict[str, torch.Tensor] = {"input": k}
    info: dict[str, str] = {}
    # name -> (layer class, nbits, axis, group)
    cases = {
        "quanto4_axis0_g16": (QuantoQuantizedLayer, 4, 0, 16),
        "quanto2_axis0_g16": (QuantoQuantizedLayer, 2, 0, 16),
        "quanto4_axis0_g8": (QuantoQuantizedLayer, 4, 0, 8),
        # axis -1 groups 8 consecutive (batch, head, token) rows per channel: with 8 tokens per head
        # these are exactly per-channel groups over the 8 tokens of one head.
        "quanto4_axism1_g8": (QuantoQuantizedLayer, 4, -1, 8),
        "quanto2_axism1_g8": (QuantoQuantizedLayer, 2, -1, 8),
        "hqq4_axis1_g16": (HQQQuantizedLayer, 4, 1, 16),
        "hqq2_axis1_g8": (HQQQuantizedLayer, 2, 1, 8),
        "hqq4_axis1_g8": (HQQQuantizedLayer, 4, 1, 8),
        "hqq8_axis1_g16": (HQQQuantizedLayer, 8, 1, 16),
    }
    for name, (cls, nbits, axis, group) in cases.items():
        layer = cls(nbits=nbits, axis_key=axis, axis_value=axis, q_group_size=group, residual_length=4)
        layer.lazy_initialization(k, k)
        q = layer._quantize(k.contiguous(), axis=axis)
        deq = layer._dequantize(q)
        tensors[f"{name}.dequantized"] = deq.float().contiguous()
        if cls is QuantoQuantizedLayer:
            data = q._data.unpack() if hasattr(q._data, "unpack") else q._data
            # codes/scale/shift in quanto's grouped layout: axis 0 -> [groups, group],
            # axis -1 -> [group, groups]; store them transposed for axis -1 so that every
            # case reads [groups, group] (codes) and [groups] (params).
            codes, scale, shift = data.to(torch.int64), q._scale.float(), q._shift.float()
            if axis == -1:
                codes, scale, shift = codes.T, scale.T, shift.T
            tensors[f"{name}.codes"] = codes.contiguous()
            tensors[f"{name}.scale"] = scale.reshape(-1).contiguous()
            tensors[f"{name}.zero"] = shift.reshape(-1).contiguous()
            info[f"{name}"] = "dequantized = scale * code - shift; code = clamp(round((x + shift) / scale), 0, 2^b-1)"
        else:
            from hqq.core.quantize import Quantizer

            w_q, m = q
            codes = Quantizer.unpack[m["packing"]](w_q, dtype=torch.float32)
            tensors[f"{name}.codes"] = codes.to(torch.int64).contiguous()
            tensors[f"{name}.scale"] = m["scale"].float().reshape(-1).contiguous()
            tensors[f"{name}.zero"] = m["zero"].float().reshape(-1).contiguous()
            info[f"{name}"] = "dequantized = (code - zero) * scale"
        err = float((deq.float() - k).abs().max())
        log(f"quant vector {name}: max |x - deq| = {err:.4f}")
    meta = {k_: str(v) for k_, v in meta.items()} | info
    save_file(tensors, out_dir / "quant_vectors.safetensors", meta)


def main_452(r: Path) -> None:
    from transformers.cache_utils import SinkCache

    out_dir = r / "tests" / "fixtures" / "kv"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "xtask/goldens/kv.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": NEW_TOKENS,
        "greedy": "generate(do_sample=False, past_key_values=SinkCache(...)), eos stopping disabled, new tokens only",
    }
    cases = []
    for name in ("llama", "qwen2"):
        fx = r / "tests" / "fixtures" / name
        model = load(fx)
        p = fixture_prompt(fx)
        # The 4.52 loader must rebuild the very same model: its dynamic greedy equals 5.23's.
        toks, _, _ = generate(model, [p], [[1] * len(p)])
        if toks[0] != fixture_greedy(fx):
            raise RuntimeError(f"{name}: transformers {transformers.__version__} does not reproduce the fixture")
        for window, sinks, plen in ((6, 2, 4), (8, 4, 5)):
            rows = [p[:plen]]
            toks, margin, _ = generate(
                model, rows, [[1] * plen], past_key_values=SinkCache(window_length=window, num_sink_tokens=sinks)
            )
            cases.append(
                {
                    "model": name,
                    "input_ids": rows,
                    "attention_mask": [[1] * plen],
                    "cache_implementation": "sink",
                    "cache_config": {"window_length": window, "num_sink_tokens": sinks},
                    "tokens": toks,
                    "min_margin": round(margin, 6),
                }
            )
            log(f"{name:8} sink window={window} sinks={sinks} prompt={plen} {toks} m={margin:.4f}")
    (out_dir / "sink.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")


def main() -> int:
    r = root()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if TV >= (5, 0):
        main_523(r)
    elif TV == (4, 52):
        main_452(r)
    else:
        sys.exit(f"transformers {transformers.__version__}: use 5.23 (requirements.txt) or 4.52 (requirements-sink.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
