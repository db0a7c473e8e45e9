"""Backend implementations of fastconv's operations.

Each backend is one adapter class (a subclass of :class:`fastconv.backends.base.Backend`)
registered by name in :mod:`fastconv._dispatch`.  Adapters receive validated,
C-contiguous arrays in the compute dtype and a geometry record from
:mod:`fastconv._args`; they never see an empty batch.
"""
