"""Running a study: the study loop and its storage (``study_loop``, ``storage``), one trial (``trial``: its
overlay and the callable ``study.optimize`` calls; ``launch``: its process or worker; ``worker``: the
long-lived workers; ``placement``: its devices), what a finished trial yields (``curves`` lives in
``report``), duplicates, pruning, progress, per-trial timing, the sequential rounds (``sequential``) and the
TRL peer."""
