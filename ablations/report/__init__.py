"""From a study's COMPLETE trials to its verdicts: trials as runs (``runs``, ``curves``,
``tensorboard_runs``),
intervals and power (``stats``), the verdict rule (``verdicts``) and the family and controls (``judge``),
``summary.json`` (``summary``), the markdown report (``markdown``), its plots (``plots``) and the baseline
map (``baseline_map``)."""
