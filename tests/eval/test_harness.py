"""The lm-eval-harness requests: batched == one at a time, consistency between them, and lm_eval itself on a local
task file (skipped without the optional extra `eval`)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from revival.data import ByteTokenizer
from revival.eval.harness import RevivalScorer
from revival.models import LanguageModel, preset_config

REQUESTS = [("The cat", " sat"), ("", "hello"), ("a much longer context than the others, ", "x"), ("ab", "cdefg")]


@pytest.fixture(scope="module", params=["xlstm[1:1]", "llama"])
def model(request):
    torch.manual_seed(0)
    config = preset_config(request.param, vocab_size=257, d_model=32, num_blocks=2, num_heads=2, chunk_size=8)
    return LanguageModel(config).double().eval()


def test_loglikelihood_batched_equals_one_at_a_time_and_a_direct_sum(model):
    tokenizer = ByteTokenizer()
    batched = RevivalScorer(model, tokenizer, batch_size=3).loglikelihood(REQUESTS)
    single = RevivalScorer(model, tokenizer, batch_size=1).loglikelihood(REQUESTS)
    for (a, greedy_a), (b, greedy_b) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-9) and greedy_a == greedy_b
    context, continuation = REQUESTS[0]
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(context + continuation)]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids)[0][0, :-1], -1)
    expected = sum(log_probs[t - 1, ids[0, t]] for t in range(ids.shape[1] - len(continuation), ids.shape[1]))
    assert batched[0][0] == pytest.approx(float(expected), abs=1e-9)


def test_greedy_continuation_is_greedy_and_generation_batches_exactly(model):
    tokenizer = ByteTokenizer()
    model = copy.deepcopy(model)
    with torch.no_grad():  # logit 0 for non-ASCII bytes and eos: the greedy text is ASCII, decoded byte for byte
        model.lm_head.weight[128:] = 0
    scorer = RevivalScorer(model, tokenizer, batch_size=4)
    requests = [("The cat", {"max_gen_toks": 5, "until": []}), ("x", {"max_gen_toks": 5, "until": []}),
                ("longer prompt here", {"max_gen_toks": 5, "until": []}), ("q", {"max_gen_toks": 3})]
    batched = scorer.generate_until(requests)
    single = RevivalScorer(model, tokenizer, batch_size=1).generate_until(requests)
    assert batched == single
    checked = 0
    for (context, _), text in zip(requests[:3], batched[:3]):
        if len(tokenizer.encode(text)) == 5:  # no early stop, bytes decoded whole: the greedy continuation
            assert scorer.loglikelihood([(context, text)])[0][1] is True
            checked += 1
    assert checked >= 1
    cut = scorer.generate_until([("The cat", {"max_gen_toks": 5, "until": [batched[0][2:3]]})])[0] \
        if len(batched[0]) >= 3 else None
    if cut is not None:
        assert batched[0][2:3] not in cut and batched[0].startswith(cut)


def test_rolling_equals_the_loglikelihood_of_the_text_after_eos(model):
    scorer = RevivalScorer(model, ByteTokenizer(), max_length=64)
    text = "def f(x):\n    return x\n"
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(scorer.loglikelihood([("", text)])[0][0],
                                                                    rel=1e-6)  # revival eval's sum is float32


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed (optional extra 'eval': pip install 'revival[eval]'; its "
                    "dependencies, datasets/pyarrow/scikit-learn/..., are too large for the dev install)")
def test_lm_eval_simple_evaluate_on_a_local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from revival.eval.lm_eval_model import RevivalLM

    rows = [{"question": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0,
             "text": f"{a} plus {b} is {a + b}."} for a in range(3) for b in range(2)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
              "test_split: test\n")
    (tmp_path / "choice.yaml").write_text(
        "task: revival_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "rolling.yaml").write_text(
        "task: revival_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tmp_path / "generate.yaml").write_text(
        "task: revival_generate\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    torch.manual_seed(0)
    model = LanguageModel(preset_config("llama", vocab_size=257, d_model=32, num_blocks=2, num_heads=2))
    lm = RevivalLM(model=model.eval(), tokenizer=ByteTokenizer(), batch_size=4, max_length=64)
    results = lm_eval.simple_evaluate(model=lm, tasks=["revival_choice", "revival_rolling", "revival_generate"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    assert 0.0 <= results["revival_choice"]["acc,none"] <= 1.0
    assert results["revival_rolling"]["bits_per_byte,none"] > 0
    assert 0.0 <= results["revival_generate"]["exact_match,none"] <= 1.0
