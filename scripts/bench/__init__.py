"""The benchmark's parts: ``harness`` (timers, memory probe, spawning), ``offline`` (dpo, rm, sft in every
batch layout) and ``onpolicy`` (ppo, fine_grained). ``scripts/benchmark.py`` is the entry point."""
