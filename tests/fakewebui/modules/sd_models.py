"""checkpoints_list (title -> CheckpointInfo) and get_closet_checkpoint_match."""
from types import SimpleNamespace

checkpoints_list = {}


def checkpoint_info(filename, name, shorthash="0123456789"):
    title = f"{name}.safetensors [{shorthash}]"
    return SimpleNamespace(filename=str(filename), name=f"{name}.safetensors", name_for_extra=name, model_name=name,
                           title=title, short_title=f"{name} [{shorthash}]", hash=shorthash[:8], shorthash=shorthash)


def get_closet_checkpoint_match(search_string):
    info = checkpoints_list.get(search_string)
    if info is not None:
        return info
    found = sorted((i for i in checkpoints_list.values() if search_string in i.title), key=lambda i: len(i.title))
    return found[0] if found else None
