"""The built-in Lora extension's module: loaded networks and the in-place merge backups."""
loaded_networks = []
refreshed = []


def restore_weights_backup(obj, field, weight):
    """As A1111 1.10.1 writes it: a plain copy_, no torch.no_grad() (its generations run under no_grad)."""
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(module):
    weights_backup = getattr(module, "network_weights_backup", None)
    bias_backup = getattr(module, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        restore_weights_backup(module, "weight", weights_backup)
    restore_weights_backup(module, "bias", bias_backup)


def list_available_networks():
    refreshed.append(1)
