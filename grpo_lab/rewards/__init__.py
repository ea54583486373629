"""Rewards: the registry and the built-in reward functions (``scoring``: exact match, format, length ...), and
the math answers' checker (``math_answers``: ``math_verify``), which ``scoring`` registers. A reward is a
function of the completions (and the query's columns) returning one float per completion; a user's own is
given by import path (``my_mod:score``)."""
