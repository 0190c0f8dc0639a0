"""Method families: one file per family (its :class:`~reclip.families.spec.Family` record),
registered in :mod:`reclip.methods`."""

from reclip.families.spec import Family, Method

__all__ = ["Family", "Method"]
