"""Loss shaping options: scheduled Huber, debiased estimation, noise variants, zero-terminal SNR."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param

HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class LossOptions:
    huber_c: float = param("float", 0.1, "Huber c", "Huber/Smooth-L1: the error where the loss turns from quadratic to linear.", minimum=1e-6, maximum=100)
    huber_schedule: str = param("choice", "snr", "Huber schedule", "constant, or exponential / snr: Huber at noisy timesteps, close to MSE at clean ones.", choices=HUBER_SCHEDULES)
    train_debiased_estimation: bool = param("bool", False, "Debiased estimation", "Weight the loss by 1/sqrt(SNR) (debiased estimation loss).")
    noise_offset_random_strength: bool = param("bool", False, "Random noise offset", "Scale the noise offset by a random factor in [0, 1) per sample.")
    multires_noise_iterations: int = param("int", 0, "Multires noise iterations", "Pyramid noise: add this many downscaled noise levels; 0 turns it off (6-10 is typical).", minimum=0, maximum=20)
    multires_noise_discount: float = param("float", 0.3, "Multires noise discount", "Each pyramid level's noise is scaled by discount^level.", minimum=0, maximum=1)
    ip_noise_gamma: float = param("float", 0.0, "Input perturbation gamma", "Input perturbation noise: the noisy input gets extra noise of this strength; 0 turns it off (0.1 is typical).", minimum=0, maximum=1)
    ip_noise_gamma_random_strength: bool = param("bool", False, "Random input perturbation", "Scale the input perturbation by a random factor in [0, 1) per sample.")
    zero_terminal_snr: bool = param("bool", False, "Zero terminal SNR", "Rescale the noise schedule to zero SNR at the last timestep (for v-prediction models).")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
