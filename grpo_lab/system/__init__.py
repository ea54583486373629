"""Process plumbing. A reader changing the algorithm need not open it: user errors as one ``error:`` line
(``errors``, a leaf) and the entry points' wrapper (``entry``), the offline and thread environment of every
process (``process_env``), child processes that die with their parent (``processes``), the DDP rendezvous
port (``ports``), seeded blocks that restore exactly the generators they seed (``rng``), and the registries
that take a name or an import path (``registry``)."""
