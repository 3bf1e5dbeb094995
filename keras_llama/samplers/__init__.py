"""Samplers: how generate() picks the next token. (Placeholder until the samplers land.)"""


def get(identifier):
    return identifier
