import json
import sys

import pytest

from envs import llm_synthetic
from envs.llm_tasks import (PromptSet, extract_choice, extract_final_answer, get_verifier, load_jsonl,
                            load_local_dataset, math_reward, multiple_choice_reward, tool_call_reward)


@pytest.mark.parametrize("text, answer, expected", [
    ("so the total is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41} wait, no: \\boxed{42}", "42", 1.0),                 # the LAST boxed answer counts
    ("\\boxed{\\frac{1}{2}} hmm", "\\frac{1}{2}", 1.0),              # nested braces kept whole
    ("we get 3, then 7, so 12", "12", 1.0),                          # no box: the last number
    ("The answer is 1,234.", "1234", 1.0),                           # thousands separator, trailing period
    ("x = 0.50", "1/2", 1.0),                                        # compared as values
    ("$-3$", "-3", 1.0),
    ("the answer is 12", "13", 0.0),
    ("no number here", "3", 0.0),
    ("\\boxed{4}", ["0", "2", "4", "6", "8"], 1.0),                   # many correct answers
    ("\\boxed{5}", ["0", "2", "4", "6", "8"], 0.0),
])
def test_math_verifier(text, answer, expected):
    assert math_reward(text, answer) == expected


def test_final_answer_extraction():
    assert extract_final_answer("\\boxed{ 1,000 }") == "1000"
    assert extract_final_answer("nothing") is None


@pytest.mark.parametrize("text, answer, expected", [
    ("The answer is (B).", "B", 1.0),
    ("Answer: c", "C", 1.0),
    ("\\boxed{D}", "D", 1.0),
    ("B. because the acid is strong", "B", 1.0),
    ("(A) is tempting but the answer is C", "C", 1.0),               # explicit statement beats a leading letter
    ("A", "(B)", 0.0),
    ("I am not sure", "A", 0.0),
])
def test_multiple_choice_verifier(text, answer, expected):
    assert multiple_choice_reward(text, answer) == expected


def test_choice_extraction_none_without_a_letter():
    assert extract_choice("no letter chosen here at all") is None


def test_tool_call_verifier_by_pattern_and_by_json_object():
    assert tool_call_reward('call get_weather(city="Paris")', r'get_weather\(city="Paris"\)') == 1.0
    assert tool_call_reward('call get_weather(city="Rome")', r'get_weather\(city="Paris"\)') == 0.0
    expected = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert tool_call_reward('Sure: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}',
                            expected) == 1.0
    assert tool_call_reward('{"name": "get_weather", "arguments": {"city": "Rome"}}', expected) == 0.0
    assert tool_call_reward('{"name": "get_time", "arguments": {"city": "Paris"}}', expected) == 0.0
    assert tool_call_reward("{not json} no call", expected) == 0.0


def test_unknown_verifier_lists_the_known_ones():
    with pytest.raises(ValueError, match="math.*multiple_choice.*tool_call"):
        get_verifier("regex")


def test_jsonl_loader_reads_configured_fields_and_rewards(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [{"question": "1+1?", "gold": "2", "solution": "\\boxed{2}"},
             {"question": "2+2?", "gold": ["4", "four"], "solution": "\\boxed{4}"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    tasks = load_jsonl(path, "math", prompt_field="question", answer_field="gold", response_field="solution")
    assert tasks.prompts == ["1+1?", "2+2?"] and tasks.responses == ["\\boxed{2}", "\\boxed{4}"]
    assert tasks.rewards([0, 1, 1], ["2", "\\boxed{5}", "it is 4"]).tolist() == [1.0, 0.0, 1.0]


def test_jsonl_loader_errors_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="set its path"):
        load_jsonl(tmp_path / "missing.jsonl", "math")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"example 2 .* no field 'answer'.*set answer_field"):
        load_jsonl(path, "math")
    path.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 .* is not JSON"):
        load_jsonl(path, "math")


def test_local_datasets_loader_needs_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_local_dataset(tmp_path, "math")


def test_prompt_set_rejects_mismatched_columns():
    with pytest.raises(ValueError, match="each example needs one of each"):
        PromptSet(["a", "b"], ["1"])


def test_synthetic_parity_task_accepts_every_digit_of_the_right_parity_only():
    tasks = llm_synthetic.parity_prompt_set(40, seed=0)
    for i, prompt in enumerate(tasks.prompts):
        n = int(prompt.split()[1])
        rewards = tasks.rewards([i] * 10, [str(d) for d in range(10)]).tolist()
        assert rewards == [float(d % 2 == n % 2) for d in range(10)]
        assert tasks.rewards([i], [tasks.responses[i]]).item() == 1.0        # SFT1 targets are correct


def test_synthetic_prior_task_and_pretraining_mixture():
    prior = llm_synthetic.next_prompt_set(20, seed=1)
    assert all(int(a) == int(p.split()[1]) + 1 for p, a in zip(prior.prompts, prior.answers))
    prompts, responses = llm_synthetic.pretraining_pairs(2000, label_noise=0.0, seed=0)
    parity = [(int(p.split()[1]), int(r)) for p, r in zip(prompts, responses) if p.startswith("parity")]
    assert len(parity) == 1000 and all(n % 2 == d % 2 for n, d in parity)
    assert len({d for _, d in parity}) == 10                           # mass spread over all correct digits
    noisy_prompts, noisy = llm_synthetic.pretraining_pairs(2000, label_noise=1.0, seed=0)
    noisy_parity = [(int(p.split()[1]), int(r)) for p, r in zip(noisy_prompts, noisy) if p.startswith("parity")]
    assert 0.4 < sum(n % 2 != d % 2 for n, d in noisy_parity) / 1000 < 0.6
