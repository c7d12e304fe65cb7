"""SD2.x: 4-level U-Net with linear projections, OpenCLIP-H (stopped at its penultimate layer by
the loader, as A1111 runs it), epsilon (512) or v-prediction (768-v)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .sd import UNetFamily

if TYPE_CHECKING:
    from .bundle import ModelBundle


class SD2(UNetFamily):
    name = "sd2"
    label = "SD2.x"
    pad_tokens = ("!",)
    model_version = "sd_v2"
    modelspec_arch = "stable-diffusion-v2-768-v"
    v_pred_detectable = True
    host_clip_skip_limit = 1  # Forge runs OpenCLIP-H at its fixed layer

    def architecture(self, v_pred: bool) -> str:
        return self.modelspec_arch if v_pred else "stable-diffusion-v2-512"

    def metadata(self, bundle: ModelBundle) -> dict[str, str]:
        return {**super().metadata(bundle), "ss_v2": "True"}
