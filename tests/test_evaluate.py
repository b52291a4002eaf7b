"""Exact-match evaluation: left-padded batched greedy generation, compared with the completions."""

import json

from tokensieve.launch.cli import main
from tokensieve.launch.evaluate import exact_match

PROMPTS = ["what is k1 ?", "sort: b a c and then some more words", "copy x", "what is k12 ?"]


def test_batched_generation_matches_one_by_one(tiny_llama, tiny_tokenizer):
    _, one_by_one = exact_match(tiny_llama, tiny_tokenizer, PROMPTS, ["?"] * 4, batch_size=1, max_new_tokens=4)
    score, batched = exact_match(tiny_llama, tiny_tokenizer, PROMPTS, ["?"] * 4, batch_size=4, max_new_tokens=4)
    assert batched == one_by_one
    # The model's own continuations are right by definition; other answers are wrong. Generation is cut at
    # the answer's length, so a model that goes on after the answer is judged on the answer alone.
    assert exact_match(tiny_llama, tiny_tokenizer, PROMPTS, batched, max_new_tokens=4)[0] == 1.0
    wrong = [p + " never" for p in batched]
    assert exact_match(tiny_llama, tiny_tokenizer, PROMPTS, wrong, max_new_tokens=4)[0] == 0.0
    prefixes = [tiny_tokenizer.decode(tiny_tokenizer(p)["input_ids"][:1]) for p in batched]
    assert exact_match(tiny_llama, tiny_tokenizer, PROMPTS, prefixes)[0] == 1.0


def test_eval_command_writes_json(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    _, predictions = exact_match(tiny_llama, tiny_tokenizer, PROMPTS[:2], ["?", "?"], max_new_tokens=3)
    rows = [{"prompt": PROMPTS[0], "completion": predictions[0]}]  # the model's own 3 tokens, decoded
    rows.append({"prompt": PROMPTS[1], "completion": " surely not this"})
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "em.json"
    assert main(["eval", str(model_dir), "--data", str(data), "--max-new-tokens", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["results"][str(data)]
    assert result == {"exact_match": 0.5, "examples": 2}
    assert "exact match" in capsys.readouterr().out


def test_eval_missing_model_is_exit_2(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "nope" in capsys.readouterr().err
