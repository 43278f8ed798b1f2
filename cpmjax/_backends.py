"""Registers the kernel and distributed attention backends with ``cpmjax.ops``.

Imported lazily by ``cpmjax.ops`` the first time a non-reference backend is asked for."""
