"""Small Python helpers shared by the package."""


class classproperty(property):
    """A read-only property of the class itself (``Cls.presets``)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


def functional_setattr(obj, parent_cls, name, value):
    """``__setattr__`` for functional models that set layers before ``super().__init__``.

    On the torch backend a Keras layer is a ``torch.nn.Module``, which refuses attributes before
    its ``__init__`` has run. All state of our functional models is tracked by the functional
    graph, so properties and attributes set before initialisation bypass module tracking.
    """
    import keras

    is_property = isinstance(getattr(type(obj), name, None), property)
    uninitialized = not obj.__dict__.get("_initialized", False)
    if keras.config.backend() == "torch" and (is_property or uninitialized):
        return object.__setattr__(obj, name, value)
    return super(parent_cls, obj).__setattr__(name, value)
