"""LLM tasks as data + a verifier: prompt sets from JSONL or a local `datasets` dataset, and binary rewards.

Task: a prompt set (``prompt``, reference ``answer``, optional SFT ``response`` per example) and a verifier
name. An ``answer`` may be one string or a list of accepted strings -- a task where many answers are correct
(the LLM analogue of ParityMNIST) lists them all.
Verifiers (``VERIFIERS``), each ``(response_text, answer) -> 0.0 | 1.0``:
- ``math``: the final answer (last ``\\boxed{...}``, else the last number) equals the reference after
  normalization (thousands separators, ``$``, trailing ``.``; numbers compared as values, fractions allowed).
- ``multiple_choice``: the chosen letter (``Answer: B``, ``(B)``, ``\\boxed{B}``, or a bare leading ``B``) equals
  the reference letter.
- ``tool_call``: the reference is a regular expression the response must contain (``re.search``, DOTALL), or a
  ``{"name": ..., "arguments": {...}}`` object that the response's first JSON object must match (name equal,
  every listed argument equal).
Nothing is downloaded: files are read from the paths given.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

Answer = str | list[str] | dict


@dataclass
class PromptSet:
    """Examples of one task: ``prompts[i]`` with reference ``answers[i]`` and optional SFT ``responses[i]``."""
    prompts: list[str]
    answers: list[Answer]
    responses: list[str] | None = None
    verifier: str = "math"

    def __post_init__(self):
        if len(self.prompts) != len(self.answers) or (self.responses is not None
                                                      and len(self.responses) != len(self.prompts)):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.answers)} answers and "
                             f"{len(self.responses or [])} responses: each example needs one of each")
        if not self.prompts:
            raise ValueError("a prompt set needs at least one example")
        get_verifier(self.verifier)

    def __len__(self) -> int:
        return len(self.prompts)

    def rewards(self, indices: list[int] | torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Binary rewards ``[N]`` (float32) of response ``texts[n]`` to example ``indices[n]``."""
        verify = get_verifier(self.verifier)
        return torch.tensor([verify(text, self.answers[int(i)]) for i, text in zip(indices, texts)])


# -- verifiers ----------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _normalize(answer: str) -> str:
    return answer.strip().strip("$").rstrip(".").replace(",", "").replace(" ", "").replace("\\!", "")


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_final_answer(text: str) -> str | None:
    """A math response's final answer: the last boxed expression, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _normalize(boxed)
    numbers = _NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def _accepted(answer: Answer) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def math_reward(text: str, answer: Answer) -> float:
    final = extract_final_answer(text)
    if final is None:
        return 0.0
    value = _as_number(final)
    for reference in map(_normalize, _accepted(answer)):
        expected = _as_number(reference)
        if final == reference or (value is not None and expected is not None
                                  and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9)):
            return 1.0
    return 0.0


_LETTER_PATTERNS = (re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.IGNORECASE),
                    re.compile(r"\\boxed\{\(?([A-J])\)?\}"),
                    re.compile(r"^\s*\(?([A-J])\)?(?:[.):\s]|$)"))


def extract_choice(text: str) -> str | None:
    """The chosen letter A-J: an explicit "answer is X" / ``\\boxed{X}`` wins over a bare leading letter."""
    for pattern in _LETTER_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1].upper()
    return None


def multiple_choice_reward(text: str, answer: Answer) -> float:
    choice = extract_choice(text)
    return float(choice is not None and choice in {a.strip().strip("()").upper() for a in _accepted(answer)})


def _first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def tool_call_reward(text: str, answer: Answer) -> float:
    if isinstance(answer, dict):
        call = _first_json_object(text)
        if call is None or call.get("name") != answer.get("name"):
            return 0.0
        arguments = call.get("arguments") or {}
        return float(all(arguments.get(k) == v for k, v in (answer.get("arguments") or {}).items()))
    return float(any(re.search(pattern, text, re.DOTALL) for pattern in _accepted(answer)))


VERIFIERS: dict[str, Callable[[str, Answer], float]] = {
    "math": math_reward,
    "multiple_choice": multiple_choice_reward,
    "tool_call": tool_call_reward,
}


def get_verifier(name: str) -> Callable[[str, Answer], float]:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}") from None


# -- loaders ------------------------------------------------------------------------------------------------------
def _from_records(records, source: str, verifier: str, prompt_field: str, answer_field: str,
                  response_field: str | None) -> PromptSet:
    prompts, answers, responses = [], [], []
    for number, record in enumerate(records, start=1):
        for field, key in (("prompt_field", prompt_field), ("answer_field", answer_field),
                           ("response_field", response_field)):
            if key and key not in record:
                raise ValueError(f"example {number} of {source} has no field {key!r} (fields: {sorted(record)}); "
                                 f"set {field} to the right name")
        prompts.append(str(record[prompt_field]))
        answers.append(record[answer_field])
        if response_field:
            responses.append(str(record[response_field]))
    return PromptSet(prompts, answers, responses if response_field else None, verifier)


def load_jsonl(path: str | Path, verifier: str, prompt_field: str = "prompt", answer_field: str = "answer",
               response_field: str | None = None) -> PromptSet:
    """One example per line of a JSON-lines file; ``response_field`` (SFT targets) is optional."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; set its path to a JSONL file with one "
                                f"{{{prompt_field!r}: ..., {answer_field!r}: ...}} object per line")
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number} of {path} is not JSON ({error.msg}); "
                                 "expected one object per line") from None
    return _from_records(records, str(path), verifier, prompt_field, answer_field, response_field)


def load_local_dataset(path: str | Path, verifier: str, split: str = "train", prompt_field: str = "prompt",
                       answer_field: str = "answer", response_field: str | None = None) -> PromptSet:
    """A dataset saved with ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict and its ``split``)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a saved `datasets` dataset needs the datasets package: pip install datasets "
                          "(or export the prompts to JSONL and use source=jsonl)") from None
    if not Path(path).exists():
        raise FileNotFoundError(f"no dataset folder at {path}; set its path to a folder written by save_to_disk")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} not in {path} (splits: {sorted(data)}); set split to one of them")
        data = data[split]
    return _from_records(data, str(path), verifier, prompt_field, answer_field, response_field)
