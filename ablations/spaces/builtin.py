"""The spaces ``grpo-lab-ablate --space NAME`` knows by name (``ablations/spaces/space.py`` defines
``Space``; this
file only registers instances). Each is data: a grid, its base config, the probe, the baseline."""

from __future__ import annotations

import dataclasses

import optuna

from ablations.spaces import controls, regimes, variants
from ablations.spaces.space import Comparison, ProbeSettings, Space, register_space

# The default study's arms: three estimators and an A/A arm. `mean_baseline` is not trained: it is exactly
# (1 − 1/G) × `rloo` (the probe, which measures all four estimators on the same rollouts in every trial,
# gives it rloo's SNR to 7 digits), so its arm repeated rloo's at a smaller step size; its 8 trials now buy
# the A/A control (ablations/report/judge.py), which passes or fails in every report.
DEFAULT_ARMS = {"reward": {"model.advantage": "reward"}, "group_norm": {"model.advantage": "group_norm"},
                "rloo": {"model.advantage": "rloo"}, "rloo (A/A)": controls.AA_ARM}
DEFAULT_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]
DEFAULT_OVERRIDES = {"trainer.max_steps": 130}  # default_noclip takes the same, so the two stay comparable
DEFAULT_COMPARISONS = (
    Comparison("group_norm", {"model.advantage": "group_norm"}, {"model.advantage": "reward"}),
    Comparison("rloo", {"model.advantage": "rloo"}, {"model.advantage": "reward"}),
    Comparison("A/A control: rloo (A/A) vs rloo", {"model.advantage": "rloo (A/A)"},
               {"model.advantage": "rloo"}, "aa_control"),
)

register_space(Space(
    name="default",
    description="advantage estimator (reward, group_norm, rloo) and an A/A arm x 8 seeds on the "
                "mostly-easy arithmetic mixture, each seed its own warm-start network, probe at the warm "
                "start and the end",
    grid={"model.advantage": list(DEFAULT_ARMS), "seed": DEFAULT_SEEDS},
    presets={"model.advantage": DEFAULT_ARMS},
    # Sized so that every SNR ratio, at each probe point and pooled, comes within ±10% in under 10 minutes
    # (issue 10; docs/results.md, "How precise the SNR ratios"). At the trials' ends most of the spread across
    # seeds is the trained policies differing, which only more trained policies narrow: 8 seeds. To pay for
    # them, 150 of configs/ablate.yaml's 200 steps (lift still ≈ +0.2) and probe batches of 16 prompts (per
    # prompt ~30% cheaper than 8, intervals as wide at equal prompts): K = 32 at the ends (512 prompts), 64 at
    # the warm start (1,024; one policy for every trial of a seed, computed once per seed). 130 steps since
    # issue 19: each seed's own warm start and the A/A arm took the study to 10 min 16 s at 150 on a 2-core
    # VM whose steps ran 25% slower than on 2026-11-26 (21.4 s per 150 steps, not 17.2; the code is not
    # slower: the session's first commit fit 100 steps in 28.8 s there, this one in 26.6 s).
    # score_prompts: the baseline map's mechanism (issue 20) from 4 queries' per-completion scores at each
    # seed's warm start (about 1 s per seed).
    probe=ProbeSettings(num_batches=32, warm_start_batches=64, prompts_per_batch=16, score_prompts=4),
    overrides=DEFAULT_OVERRIDES,
    baseline={"model.advantage": "reward"},
    comparisons=DEFAULT_COMPARISONS,
))

# The clipping confound (issue 19): with max_grad_norm 1.0, group_norm's pre-clip norm is above it on most
# steps and the other arms' on few, so clipping acts on one arm. The same three estimators and seeds with
# clipping off, trained only (the probe measures gradients before any clipping, so its SNR rows would be
# the default study's): the default report reads this study's AUC verdicts beside its own.
register_space(Space(
    name="default_noclip",
    description="the default study's estimators (reward, group_norm, rloo) x 8 seeds with gradient clipping "
                "off: does claim (iii)'s AUC verdict depend on clipping?",
    grid={"model.advantage": [a for a in DEFAULT_ARMS if a != "rloo (A/A)"], "seed": DEFAULT_SEEDS},
    probe=None,
    overrides={**DEFAULT_OVERRIDES, "model.max_grad_norm": None},  # the default's steps, whatever they are
    baseline={"model.advantage": "reward"},
))

register_space(Space(
    name="smoke",
    description="2 estimators x 2 seeds on a tiny policy: checks the harness end to end in about a minute",
    grid={"model.advantage": ["reward", "rloo"], "seed": [0, 1]},
    base_config="configs/ablate_smoke.yaml",
    probe=ProbeSettings(num_batches=8, prompts_per_batch=4, at_fractions=(0.0, 1.0)),
    threshold=0.15,
    baseline={"model.advantage": "reward"},
))

# One factor at a time around the default GRPO objective (group_norm, token_mean, clip 0.2, beta 0, mu 1):
# the full product of the four factors would be 24 points x seeds, most of them uninformative.
register_space(Space(
    name="objectives",
    description="loss variants around group_norm, one factor at a time: aggregation, clip_high, KL, mu",
    grid={"variant": ["grpo", "sequence_mean", "constant", "clip_high_0.28", "beta_0.04", "mu_2"],
          "seed": [0, 1, 2]},
    presets={"variant": {
        "grpo": {},
        "sequence_mean": {"model.aggregation": "sequence_mean"},
        "constant": {"model.aggregation": "constant"},
        "clip_high_0.28": {"model.clip_high": 0.28},
        "beta_0.04": {"model.beta": 0.04},
        # max_steps counts optimizer steps, so mu=2 makes as many updates from half as many rollouts.
        "mu_2": {"model.num_iterations": 2},
    }},
    overrides={"model.advantage": "group_norm"},
    probe=None,
    baseline={"variant": "grpo"},
))

# Single process vs DDP on CPU (gloo). The global batch is the same everywhere: data.prompts_per_step is
# global, so ddp2 runs 2 processes with half the prompts each. 'auto' with 2 devices is not a valid
# combination, hence one key with presets.
register_space(Space(
    name="strategies",
    description="single process vs DDP with 1 and 2 CPU processes (gloo), same global batch",
    grid={"strategy": ["single", "ddp1", "ddp2"], "seed": [0, 1]},
    presets={"strategy": {
        "single": {"trainer.strategy": "auto", "trainer.devices": 1},
        "ddp1": {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 1},
        "ddp2": {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 2},
    }},
    overrides={"model.advantage": "group_norm"},
    probe=None,
    baseline={"strategy": "single"},
))

# A tuning space: TPE over the learning rate and clip_high, median-pruned on sampled validation accuracy.
register_space(Space(
    name="tune_lr",
    description="TPE over AdamW lr and clip_high with RLOO, median-pruned on val/acc_sampled",
    distributions={
        "model.optimizer.init_args.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
        "model.clip_high": optuna.distributions.FloatDistribution(0.2, 0.4),
    },
    n_trials=12,
    overrides={"model.advantage": "rloo"},
    probe=None,
))

# Controls (ablations/spaces/controls.py): a reward shift of +3 every centred estimator must see through,
# and rloo
# against itself on seeds shifted by 1000 (A/A).
CONTROL_COMPARISONS = tuple(Comparison(*c) for c in controls.COMPARISONS)

register_space(Space(
    name="controls",
    description="controls: a reward shift of +3 that every centred estimator must see through (positive), "
                "and rloo against itself on independent seeds (A/A)",
    grid={"arm": list(controls.ARMS), "seed": [0, 1, 2, 3]},
    presets={"arm": controls.ARMS},
    overrides=controls.SHIFTED_REWARD,
    baseline={"arm": "reward+3"},
    comparisons=CONTROL_COMPARISONS,
))

register_space(Space(
    name="controls_smoke",
    description="the controls on the smoke policy, 8 steps, with a dense reward (completion length) the "
                "probe resolves in a few batches: tests, and a quick check of a new machine",
    grid={"arm": list(controls.ARMS), "seed": [0, 1, 2]},
    presets={"arm": controls.ARMS},
    overrides={**controls.SHIFTED_DENSE_REWARD, "trainer.max_steps": 8, "trainer.val_check_interval": 4},
    base_config="configs/ablate_smoke.yaml",
    probe=ProbeSettings(num_batches=12, prompts_per_batch=4, at_fractions=(0.0, 1.0)),
    threshold=0.5,
    baseline={"arm": "reward+3"},
    comparisons=CONTROL_COMPARISONS,
    # One network for its 3 seeds: a check of the harness at 8 steps, not a claim about initial policies.
    # With a network per seed the shift's SNR differences spread too widely at 3 seeds: under
    # ATEN_CPU_CAPABILITY=default the positive control missed (p = 0.12-0.13).
    population="one_network",
))

# The field's GRPO variants, one factor at a time around GRPO (data in ablations/spaces/variants.py).
register_space(Space(
    name="field",
    description="the field's GRPO variants one at a time around GRPO (mu 2, 6 tokens): loss, advantage, "
                "reward, sampling",
    grid={"variant": list(variants.VARIANTS), "seed": [0, 1, 2, 3, 4, 5]},
    presets={"variant": variants.VARIANTS},
    overrides={"model.advantage": "group_norm", "model.num_iterations": 2, "model.max_new_tokens": 6},
    probe=ProbeSettings(estimators=variants.PROBE_ESTIMATORS),
    baseline={"variant": "grpo"},
))

# Peer parity (issue 10): group_norm trained by grpo_lab and by TRL's GRPOTrainer (the [bench] extra,
# ablations/runner/trl_peer.py) from the same warm start, data order and hyperparameters, paired by seed.
register_space(Space(
    name="trl_parity",
    description="group_norm trained by grpo_lab and by TRL's GRPOTrainer from the same warm start, data "
                "order and hyperparameters: do the reward curves agree within seed intervals?",
    grid={"peer": ["grpo_lab", "trl"], "seed": [0, 1, 2, 3, 4, 5]},
    presets={"peer": {"grpo_lab": {}, "trl": {}}},
    overrides={"model.advantage": "group_norm"},
    probe=None,
    baseline={"peer": "grpo_lab"},
))

# The baseline map's regimes (issue 20, item 3; ablations/spaces/regimes.py): probe-only cells, the warm
# start probed
# before one optimizer step, over G, the task mix (success rate) and the reward's coding a·r + b.
REGIMES = register_space(Space(
    name="regimes",
    description="baseline regimes: V(rloo)/V(reward), c* and the mechanism's prediction at the warm start, "
                "over group size, task mix and reward coding (probe-only cells)",
    grid={"model.num_generations": regimes.GROUP_SIZES, "mix": list(regimes.MIXES),
          "coding": list(regimes.CODINGS), "seed": [0, 1, 2]},
    presets=regimes.PRESETS,
    overrides=regimes.OVERRIDES,
    probe=ProbeSettings(estimators=("reward", "rloo"), num_batches=24, prompts_per_batch=8,
                        at_fractions=(0.0,), score_prompts=4),
    baseline={"coding": "r", "mix": "mixed", "model.num_generations": 16},
    comparisons=(Comparison("r+3 vs r (G = 16, mixed)",
                            {"coding": "r+3", "mix": "mixed", "model.num_generations": 16},
                            {"coding": "r", "mix": "mixed", "model.num_generations": 16}),),
))

# The regimes after a short training (issue 20, item 3): every cell of `regimes`, probed at the warm start
# and after 60 rloo steps (the trained policy: a higher success rate, its own score norms).
register_space(dataclasses.replace(
    REGIMES,
    name="regimes_trained",
    description="baseline regimes at the warm start and after 60 rloo steps: group size, task mix and reward "
                "coding",
    overrides={**regimes.OVERRIDES, "trainer.max_steps": regimes.TRAINED_STEPS},
    probe=dataclasses.replace(REGIMES.probe, at_fractions=(0.0, 1.0)),
    comparisons=None,
))

# Does lower variance buy faster learning? (issue 20, item 4): A_i = r_i − c·b̄₋ᵢ trained at c = 0 (reward),
# at the warm start's measured c* (0.18, the baseline map of configs/ablate.yaml's warm start, 3 seeds) and at
# c = 1 (rloo), paired by seed, on the default study's task and length.
register_space(Space(
    name="baseline_coef",
    description="A_i = r_i − c·(leave-one-out mean) trained at c = 0, the warm start's c* = 0.18 and c = 1",
    grid={"model.baseline_coef": [0.0, 0.18, 1.0], "seed": [0, 1, 2, 3, 4, 5, 6, 7]},
    overrides={"model.advantage": "baseline_coef", "trainer.max_steps": 150},
    probe=None,
    baseline={"model.baseline_coef": 0.0},
))

# The field's variance-motivated baselines as arms of the learning study (issue 20, item 4), beside b = 0
# (`reward`) and the leave-one-out mean (`rloo`): the batch's own variance-optimal c (`online_coef`), OPO's
# length-weighted mean, the optimal-token (gradient-weighted) mean, REINFORCE++'s baseline (group mean,
# batch std: `batch_norm`) and MaxRL's mean scale. 150 steps and seeds 0-7 as `baseline_coef`, so `reward`
# and `rloo` repeat its c = 0 and c = 1 trajectories. Every estimator is probed on the same rollouts at each
# seed's warm start (K = 64 x 16 prompts, once per seed): paired SNR rows at 8 networks, not at the trained
# policies (probing 7 estimators at each of 56 ends would cost more than the training).
BASELINE_ARMS = ("reward", "rloo", "online_coef", "opo", "gradient_weighted", "batch_norm", "maxrl")
register_space(Space(
    name="field_baselines",
    description="the field's variance-motivated baselines (online c*, OPO, optimal-token, REINFORCE++, "
                "MaxRL) against reward and rloo: lower variance, faster learning?",
    grid={"model.advantage": list(BASELINE_ARMS), "seed": DEFAULT_SEEDS},
    overrides={"trainer.max_steps": 150},
    probe=ProbeSettings(estimators=BASELINE_ARMS, num_batches=64, prompts_per_batch=16, at_fractions=(0.0,)),
    baseline={"model.advantage": "reward"},
))

# The oracle baseline b = p_q, measured (issue 20, item 2): at each seed's warm start of the default study,
# the probe draws 4·G more completions per query for p̂_q (grpo_lab/probe/gradients.py, `success_rate`), so
# r − p̂_q is unbiased, and measures its variance beside b = 0 (`reward`) and the leave-one-out mean (`rloo`)
# on the same rollouts. Probe-only: one optimizer step after the probe, as the regimes cells.
register_space(Space(
    name="oracle",
    description="the oracle baseline b = p (from 4G extra samples per query) measured beside reward and rloo "
                "at the default study's warm starts (probe-only)",
    grid={"seed": DEFAULT_SEEDS},
    overrides={**DEFAULT_OVERRIDES, **regimes.OVERRIDES},
    probe=ProbeSettings(estimators=("reward", "rloo", "oracle_p"), num_batches=32, prompts_per_batch=16,
                        at_fractions=(0.0,), score_prompts=4),
))
