"""Built-in synthetic LLM tasks for the embedded default (no files, no downloads), mirroring ParityMNIST.

Task (new): ``"parity N ?"`` -> any digit with the parity of N is correct (5 of 10 digits), so the KL-minimal
correct policy is the base restricted to those digits -- many answers are right, as in ParityMNIST.
Prior task: ``"next N ?"`` -> N + 1, scored by greedy accuracy; fine-tuning on parity should not have to touch it.
Pretraining mixture: parity prompts answered by a digit of the right parity drawn uniformly (the base spreads its
mass over every correct answer), except a ``label_noise`` fraction answered by any digit -- so the base is
correct only part of the time and on-policy RL has a signal from the first step -- plus correct "next" pairs.
Both tasks are scored by the shared ``math`` verifier (last number in the response).
"""
from __future__ import annotations

import random

from envs.llm_tasks import PromptSet

WORDS = ["parity", "next", "?"]
MAX_NUMBER = 49        # prompts use 0 .. MAX_NUMBER - 1; "next" answers reach MAX_NUMBER
DIGITS = [str(d) for d in range(10)]


def parity_prompt_set(size: int, seed: int) -> PromptSet:
    """New task. SFT targets (``responses``) are the paper's SFT1 labels: 0 for even N, 1 for odd N."""
    rng = random.Random(seed)
    numbers = [rng.randrange(MAX_NUMBER) for _ in range(size)]
    return PromptSet(prompts=[f"parity {n} ?" for n in numbers],
                     answers=[[d for d in DIGITS if int(d) % 2 == n % 2] for n in numbers],
                     responses=[str(n % 2) for n in numbers], verifier="math")


def next_prompt_set(size: int, seed: int) -> PromptSet:
    """Prior task: the successor of N."""
    rng = random.Random(seed)
    numbers = [rng.randrange(MAX_NUMBER) for _ in range(size)]
    return PromptSet(prompts=[f"next {n} ?" for n in numbers], answers=[str(n + 1) for n in numbers],
                     responses=[str(n + 1) for n in numbers], verifier="math")


def pretraining_pairs(size: int, label_noise: float, seed: int) -> tuple[list[str], list[str]]:
    """``size`` (prompt, response) pairs, half per task, shuffled."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(size // 2):
        n = rng.randrange(MAX_NUMBER)
        if rng.random() < label_noise:
            digit = rng.randrange(10)
        else:
            digit = rng.choice([d for d in range(10) if d % 2 == n % 2])
        pairs.append((f"parity {n} ?", str(digit)))
        m = rng.randrange(MAX_NUMBER)
        pairs.append((f"next {m} ?", str(m + 1)))
    rng.shuffle(pairs)
    return [p for p, _ in pairs], [r for _, r in pairs]


SYNTHETIC_TASKS = {"parity": parity_prompt_set, "next": next_prompt_set}
