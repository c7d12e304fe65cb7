"""The one training loop and what it uses: losses, noise, optimizers, state, logs."""
