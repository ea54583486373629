"""Named search spaces: the ``Space`` dataclass and its registry (``space``), and the built-in spaces
(``builtin``, with the data of their arms: ``variants``, ``controls``, ``regimes``), which the ``ablations``
package imports so that the registry never imports what registers into it."""
