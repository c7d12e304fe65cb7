gc_calls = []


def torch_gc():
    gc_calls.append(1)
