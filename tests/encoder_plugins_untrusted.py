"""Imported only if a model.json could make raybackfill run code on its own: the trust tests assert it never is."""

IMPORTED = True


def make() -> object:
    raise AssertionError("an untrusted entrypoint ran")
