"""Whether stage 3 learns from its rollouts, seed by seed: the same stage, several seeds, one table.

GRPO learns only on steps where some group's rewards differ, and a tiny model's rollouts are often all
malformed alike. This runs ``qprobe train stage3`` (the ``stage3:`` section of ``params.yaml``, on the
DVC outputs it depends on: run ``dvc repro stage2 trajectories`` first) once per seed, each into a
temporary folder and its own MLflow store, ``--parallel`` at a time with one torch thread each
(benchmarks/stage2_seeds.py does the running), and prints each run's ``signal_steps`` (the share of
steps where some group's rewards differ), the mean format reward of the first and the last quarter of
the steps, their crop calls per rollout (a model can write well-formed rollouts by no longer cropping),
the last step's reward, and the seconds each run took::

    .venv/bin/python benchmarks/stage3_seeds.py --seeds 0 1 2 --parallel 2
    .venv/bin/python benchmarks/stage3_seeds.py --seeds 0 1 -- --max-steps 30   # extra stage-3 flags
"""

from __future__ import annotations

from stage2_seeds import main

KEYS = ("signal_steps", "format_first_quarter", "format_last_quarter", "tool_calls_first_quarter",
        "tool_calls_last_quarter", "reward")

if __name__ == "__main__":
    main("stage3", KEYS, __doc__)
