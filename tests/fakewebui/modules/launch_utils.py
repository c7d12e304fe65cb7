tag = "v1.10.1"


def git_tag():
    return tag
