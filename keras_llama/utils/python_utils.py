"""Small Python helpers shared by the package."""


class classproperty(property):
    """A read-only property of the class itself (``Cls.presets``)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)
