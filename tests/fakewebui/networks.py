"""The built-in Lora extension's module: loaded networks and the in-place merge backups."""
import torch

loaded_networks = []
refreshed = []


def network_restore_weights_from_backup(module):
    backup = getattr(module, "network_weights_backup", None)
    if backup is not None:
        with torch.no_grad():
            module.weight.copy_(backup)


def list_available_networks():
    refreshed.append(1)
