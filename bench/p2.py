"""P2: the trainer's steps/s over a peft reference loop's (bench/reference.py), side by side.

Rounds run ref, trainer, ref, trainer, ..., ref on the same model, images, rank,
alpha and batch; each round's ratio is the mean of the neighbouring reference
medians (ms/step) over the trainer's median, i.e. trainer steps/s / reference
steps/s. The trainer caches latents before its first step, so its steps skip the
VAE; the reference encodes each step. Start-up (including that caching) is
reported apart, by bench/startup.py.
"""
from __future__ import annotations

import statistics

from bench import reference
from bench.common import ALPHA, LEARNING_RATE, RANK, SEED


def trainer_targets(b) -> tuple[list[str], int]:
    """Paths of the U-Net layers the trainer's lierla network covers, and its parameter count."""
    from trainer.networks.network import Network

    network = Network.build(b.bundle, b.cfg("lierla", 1))
    try:
        names = {id(m): name for name, m in b.bundle.unet.named_modules()}
        return sorted(names[id(m.org_module[0])] for m in network.unet_modules), network.n_params
    finally:
        network.remove()


def _median_ms(seg: tuple[list[float], list[float]], warmup: int) -> float:
    wall = seg[0][warmup:] if len(seg[0]) > warmup else seg[0][-1:]
    return 1000.0 * statistics.median(wall)


def bench_p2(b, trainer_ms_of) -> dict:
    """P2 for both reference variants; `trainer_ms_of()` runs one trainer segment, returns its median ms."""
    why = reference.peft_missing()
    if why is not None:
        print(f"P2 skipped: {why}", flush=True)
        return {"P2": None, "P2_reason": why}
    a = b.args
    targets, trainer_params = trainer_targets(b)
    refs = {}
    for variant, names in (("attention", list(reference.ATTENTION_TARGETS)), ("same", targets)):
        unet, params = reference.with_peft_lora(b.pristine, RANK, ALPHA, names)
        refs[variant] = reference.Reference(b.bundle, unet, params, b.data, LEARNING_RATE)
    ref_ms = {v: [_median_ms(r.segment(a.steps, SEED), a.warmup)] for v, r in refs.items()}
    trainer_ms = []
    for rnd in range(a.rounds):
        trainer_ms.append(trainer_ms_of())
        for v, r in refs.items():
            ref_ms[v].append(_median_ms(r.segment(a.steps, SEED + rnd + 1), a.warmup))
        print(f"  P2 round {rnd + 1}: peft attention {ref_ms['attention'][-2]:.1f}/{ref_ms['attention'][-1]:.1f} | "
              f"peft same layers {ref_ms['same'][-2]:.1f}/{ref_ms['same'][-1]:.1f} | "
              f"trainer {trainer_ms[-1]:.1f} ms/step", flush=True)
    ratios = {v: [(ms[i] + ms[i + 1]) / 2 / t for i, t in enumerate(trainer_ms)] for v, ms in ref_ms.items()}
    return {
        "P2": round(statistics.median(ratios["attention"]), 4),
        "P2_same_layers": round(statistics.median(ratios["same"]), 4),
        "P2_by_round": {v: [round(x, 4) for x in r] for v, r in ratios.items()},
        "P2_ms_per_step": {"trainer": round(statistics.median(trainer_ms), 1),
                           **{f"peft_{v}": round(statistics.median(ms), 1) for v, ms in ref_ms.items()}},
        "P2_trained": {
            "trainer": f"lierla on {len(targets)} U-Net layers, {trainer_params:,} params, cached latents",
            "peft_attention": f"to_q/to_k/to_v/to_out.0 ({refs['attention'].n_params:,} params), VAE each step",
            "peft_same": f"the trainer's {len(targets)} layers ({refs['same'].n_params:,} params), VAE each step"},
    }
