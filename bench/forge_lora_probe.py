"""Inside a real Forge (no server): merge a LoRA file's text-encoder part with Forge's own LoRA code and
compare every merged weight with the weight + delta computed by hand in fp32, then encode a prompt.

    cd FORGE_DIR && FORGE_PYTHON TRAINDECK/bench/forge_lora_probe.py CKPT LORA_FILE [--always-cpu ...]

Prints, as JSON: how many text-encoder weights Forge merged, the largest difference between Forge's
merged weight and the hand-made one, whether Forge's merged weights and the hand-made ones are all
finite, and whether the prompt's conditioning is finite before and after the merge (Forge's text
engine, then the same engine on the hand-merged weights).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ckpt, lora_path, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.path[0] = os.getcwd()
    sys.argv = [sys.argv[0], "--skip-prepare-environment", "--skip-install", "--skip-version-check", "--ckpt", ckpt,
                *extra]
    import torch
    import webui  # noqa: F401 (Forge's initialisation)
    from backend.patcher.lora import load_lora, model_lora_keys_clip
    from backend.utils import load_torch_file
    from modules import sd_models
    from modules_forge import main_entry

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lora_nan import deltas

    main_entry.refresh_model_loading_parameters()
    model, _ = sd_models.forge_model_reload()
    engine = model.text_processing_engine
    prompt = ["a red circle, simple shapes"]
    clip = model.forge_objects.clip
    with torch.inference_mode():
        before = engine(prompt)
    patches, unmatched = load_lora(load_torch_file(lora_path, safe_load=True), model_lora_keys_clip(clip.cond_stage_model))
    clone = clip.clone()
    clone.add_patches(filename="probe", patches=patches, strength_patch=1.0)
    clone.patcher.refresh_loras()
    params = dict(clip.cond_stage_model.named_parameters())
    backup = clone.patcher.lora_loader.backup
    # the hand-made delta, by kohya name -> Forge key
    te_names = {"lora_te_" + k[len("clip_l.transformer."):-len(".weight")].replace(".", "_"): k for k in params
                if k.startswith("clip_l.transformer.text_model.") and k.endswith(".weight")}
    hand = deltas(Path(lora_path), {n: type("W", (), {"weight": params[k]})() for n, k in te_names.items()},
                  only_prefix="lora_te_")
    worst, merged_finite, hand_finite = 0.0, True, True
    with torch.inference_mode():
        after = engine(prompt)
        for name, delta in hand.items():
            key = te_names[name]
            want = backup[key].float() + delta
            got = params[key].float()
            worst = max(worst, float((got - want).abs().max()))
            merged_finite &= bool(torch.isfinite(got).all())
            hand_finite &= bool(torch.isfinite(want).all())
    emphasis_means = watch_emphasis()
    with torch.inference_mode():
        engine([""])  # the empty negative prompt, on the merged weights
    empty = emphasis_means[-1]
    clone.refresh_loras = None  # the clone is done with; the generation below merges the file itself
    clip.patcher.refresh_loras()
    first_bad = generate_with_hooks(model, Path(lora_path).stem)
    print(json.dumps({"empty_prompt_emphasis": empty, "first_non_finite_in_generation": first_bad, "merged": len(backup), "unmatched": len(unmatched), "hand_deltas": len(hand),
                      "largest_forge_vs_hand": worst, "merged_finite": merged_finite, "hand_finite": hand_finite,
                      "cond_before_finite": bool(torch.isfinite(before).all()), "cond_before_max": float(before.abs().max()),
                      "cond_after_finite": bool(torch.isfinite(after).all()),
                      "cond_after_max": float(after.abs().nan_to_num(float("inf")).max())}))
    return 0


def watch_emphasis() -> list[dict]:
    """Record what Forge's default emphasis ("Original") sees: the mean it divides by, and the result."""
    import torch
    from backend.text_processing import emphasis

    seen: list[dict] = []
    original = emphasis.EmphasisOriginal.after_transformers

    def after(self):
        mean = float(self.z.float().mean())
        original(self)
        seen.append({"z_mean": mean, "finite_after": bool(torch.isfinite(self.z).all())})
    emphasis.EmphasisOriginal.after_transformers = after
    return seen


def generate_with_hooks(model, lora_name: str) -> list[str]:
    """One 64x64 2-step txt2img with the file on the text encoder only; the first U-Net/VAE parts whose
    input or output is not finite, in call order."""
    import torch
    import networks
    from modules import processing

    from modules import script_callbacks

    script_callbacks.before_ui_callback()  # registers the Lora extra network, as the WebUI does before its UI
    networks.list_available_networks()
    bad: list[str] = []

    def hook(name):
        def check(_m, args, out):
            for what, t in (("input", args[0] if args else None), ("output", out[0] if isinstance(out, tuple) else out)):
                if torch.is_tensor(t) and not torch.isfinite(t).all() and len(bad) < 12:
                    bad.append(f"{name} {what} (max finite {float(t.nan_to_num(0, 0, 0).abs().max()):.3g})")
        return check

    unet = model.forge_objects.unet.model.diffusion_model
    vae = model.forge_objects.vae.first_stage_model
    handles = [m.register_forward_hook(hook(f"unet.{n}")) for n, m in unet.named_modules() if n.count(".") <= 2 and n]
    handles += [m.register_forward_hook(hook(f"vae.{n}")) for n, m in vae.named_modules() if n.count(".") <= 2 and n]

    def context(_m, args, kwargs):
        ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
        if torch.is_tensor(ctx) and len(bad) < 12:
            rows = [f"{bool(torch.isfinite(r).all())}/{float(r.nan_to_num(0, 0, 0).abs().max()):.3g}" for r in ctx]
            bad.append(f"context rows finite/max {rows}")
    handles.append(unet.input_blocks[1][1].register_forward_pre_hook(context, with_kwargs=True))
    try:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=model, prompt=f"a red circle, simple shapes <lora:{lora_name}:1:0>", negative_prompt="", seed=1234,
            width=64, height=64, steps=2, cfg_scale=7, sampler_name="Euler", batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True)
        import numpy as np
        image = np.asarray(processing.process_images(p).images[0])
        bad.append(f"image max pixel {int(image.max())}")
    finally:
        for h in handles:
            h.remove()
    return bad


if __name__ == "__main__":
    sys.exit(main())
