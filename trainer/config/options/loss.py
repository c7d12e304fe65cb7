"""Loss shaping options: scheduled Huber, debiased estimation, noise variants, zero-terminal SNR."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import ConfigError, param

HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass
class LossOptions:
    huber_c: float = param("float", 0.1, "Huber c", "Huber / Smooth-L1: the error where the loss turns from quadratic to linear (constant schedule), or its value at the noisiest timestep (exponential, snr).", minimum=1e-6, maximum=100, group="loss")
    huber_schedule: str = param("choice", "snr", "Huber schedule", "constant: c = huber_c at every timestep; exponential / snr: c falls from 1 at clean timesteps to huber_c at noisy ones (Huber when noisy, close to MSE when clean).", choices=HUBER_SCHEDULES, group="loss")
    train_debiased_estimation: bool = param("bool", False, "Debiased estimation", "Weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction); combines with min-SNR by multiplying.", group="loss")
    noise_offset_random_strength: bool = param("bool", False, "Random noise offset", "Scale the noise offset by a random factor in [0, 1) per sample (needs noise_offset above 0).", group="noise")
    multires_noise_iterations: int = param("int", 0, "Multires noise iterations", "Pyramid noise: add this many noise levels, each smaller by a random factor in [2, 4); 0 turns it off (6-10 is typical).", minimum=0, maximum=20, group="noise")
    multires_noise_discount: float = param("float", 0.3, "Multires noise discount", "Level i of the pyramid noise is scaled by discount^i.", minimum=0, maximum=1, group="noise")
    ip_noise_gamma: float = param("float", 0.0, "Input perturbation gamma", "Input perturbation: the U-Net's input is noised with noise + gamma * N(0,1) while the target stays the noise; 0 turns it off (0.1 is typical).", minimum=0, maximum=1, group="noise")
    ip_noise_gamma_random_strength: bool = param("bool", False, "Random input perturbation", "Scale the input perturbation by a random factor in [0, 1) per sample (needs ip_noise_gamma above 0).", group="noise")
    zero_terminal_snr: bool = param("bool", False, "Zero terminal SNR", "Train on a copy of the noise schedule rescaled to zero SNR at the last timestep; meant for v-prediction models (an epsilon model gets a warning).", group="noise")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
        if self.noise_offset_random_strength and self.noise_offset <= 0:
            raise ConfigError("noise_offset_random_strength", True, "needs noise_offset above 0")
        if self.ip_noise_gamma_random_strength and self.ip_noise_gamma <= 0:
            raise ConfigError("ip_noise_gamma_random_strength", True, "needs ip_noise_gamma above 0")
        huber = self.train_loss_function in ("Huber", "Smooth-L1")
        if huber and self.huber_schedule != "constant" and self.huber_c > 1:
            # c runs from 1 (clean) to huber_c (noisy): above 1 the schedule would run backwards.
            raise ConfigError("huber_c", self.huber_c,
                              f"must be 1 or less with the {self.huber_schedule} Huber schedule")
