"""Apply a saved LoRA/LoHa/LoKr file to its model by hand, in fp32, and look for overflow and NaN.

    python bench/lora_nan.py CHECKPOINT LORA_FILE [--multiplier 1] [--prompt P] [--seed 1234] [--out FILE]

A WebUI that turns an image black (NaN) or raises NansException with a file may do so because
the file is wrong or because the model's numbers overflow. This reads the file's tensors and
computes each module's delta from the formulas alone (LoRA up·down·alpha/rank, LoHa
(w1a·w1b)∘(w2a·w2b), LoKr w1⊗w2; scale alpha/rank), adds it to the checkpoint's weights in fp32
and runs the text encoder and one U-Net step (at the first sigma of a 2-step Euler schedule) on
a 64x64 latent. It reports, for the model with and without the delta, the largest magnitude each
part reaches and whether anything is inf or NaN in fp32, and where fp16 (largest finite value
65504) would overflow. No WebUI code is used; the model is read by Traindeck's own loader.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FP16_MAX = 65504.0


def deltas(path: Path, names: dict[str, torch.nn.Module], only_prefix: str = "") -> dict[str, torch.Tensor]:
    """Module name -> the delta its weight gets, from the file's tensors only (names starting `only_prefix`)."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    out: dict[str, torch.Tensor] = {}
    for prefix in sorted({k.split(".", 1)[0] for k in sd if k.startswith(only_prefix)}):
        t = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        module = names.get(prefix)
        if module is None:
            raise KeyError(f"{prefix}: no module of the model has this name")
        shape = module.weight.shape
        if "lora_down.weight" in t:
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            rank = down.shape[0]
            delta = up.flatten(1) @ down.flatten(1)
        elif "hada_w1_a" in t:
            rank = t["hada_w1_b"].shape[0]
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        elif "lokr_w1" in t or "lokr_w1_a" in t:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
            rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None)
            if w2.dim() == 2 and len(shape) == 4:  # a conv's kernel folded into w2's columns
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            delta = torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)
        else:
            raise KeyError(f"{prefix}: unknown network tensors {sorted(t)}")
        alpha = t.get("alpha")
        scale = float(alpha) / rank if alpha is not None and rank else 1.0
        if "dora_scale" in t:
            raise KeyError(f"{prefix}: DoRA files are not handled here")
        out[prefix] = (delta * scale).reshape(shape)
    return out


def kohya_names(bundle) -> dict[str, torch.nn.Module]:
    names = {}
    for name, m in bundle.unet.named_modules():
        if hasattr(m, "weight") and m.weight is not None:
            names["lora_unet_" + name.replace(".", "_")] = m
    te = bundle.text_encoders[0]
    for name, m in te.named_modules():
        if hasattr(m, "weight") and m.weight is not None:
            full = name if name.startswith("text_model.") else "text_model." + name
            names["lora_te_" + full.replace(".", "_")] = m
    return names


def peaks(bundle, prompt: str, seed: int) -> dict:
    """Largest |value| out of each text-encoder layer and U-Net block, and of the U-Net output."""
    from trainer.families.textenc import encode_prompts

    found: dict[str, float] = {}

    def hook(name):
        def record(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out):
                found[name] = max(found.get(name, 0.0), float(out.detach().abs().nan_to_num(float("inf")).max()))
        return record

    te = bundle.text_encoders[0]
    handles = [m.register_forward_hook(hook(f"te.{n}")) for n, m in te.named_modules() if n.count(".") <= 3 and n]
    handles += [m.register_forward_hook(hook(f"unet.{n}")) for n, m in bundle.unet.named_children()]
    handles += [m.register_forward_hook(hook(f"unet.{n}.{i}")) for n in ("down_blocks", "up_blocks")
                for i, m in enumerate(getattr(bundle.unet, n))]
    try:
        with torch.no_grad():
            cond = encode_prompts(bundle, [prompt]).hidden
            sigmas = ((1 - bundle.noise_scheduler.alphas_cumprod) / bundle.noise_scheduler.alphas_cumprod) ** 0.5
            sigma = float(sigmas[-1])
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(1, 4, 8, 8, generator=g) * sigma
            out = bundle.unet(x / (sigma**2 + 1) ** 0.5, 999, encoder_hidden_states=cond).sample
    finally:
        for h in handles:
            h.remove()
    worst = max(found.values())
    return {"cond_max": float(cond.abs().max()), "unet_out_max": float(out.abs().max()),
            "finite_fp32": bool(torch.isfinite(cond).all() and torch.isfinite(out).all()),
            "largest": round(worst, 1), "where": max(found, key=found.get),
            "over_fp16_max": sorted(k for k, v in found.items() if v > FP16_MAX)}


def main(argv: list[str] | None = None) -> int:
    from trainer.families.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("lora", nargs="+")
    ap.add_argument("--multiplier", type=float, default=1.0)
    ap.add_argument("--prompt", default="a red circle, simple shapes")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    bundle = load_model(Path(a.checkpoint), dtype=torch.float32, device=torch.device("cpu"))
    result = {"checkpoint": a.checkpoint, "multiplier": a.multiplier, "without": peaks(bundle, a.prompt, a.seed)}
    print(json.dumps({"without": result["without"]}), flush=True)
    names = kohya_names(bundle)
    for lora in a.lora:
        ds = deltas(Path(lora), names)
        originals = {prefix: names[prefix].weight.detach().clone() for prefix in ds}
        with torch.no_grad():
            for prefix, d in ds.items():
                names[prefix].weight += a.multiplier * d
            result[Path(lora).name] = {"modules": len(ds), "largest_delta": float(max(d.abs().max() for d in ds.values())),
                                       **peaks(bundle, a.prompt, a.seed)}
            for prefix, w in originals.items():
                names[prefix].weight.copy_(w)
        print(json.dumps({Path(lora).name: result[Path(lora).name]}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
