"""Method options from the methods' declarations: the old GPTQ spellings still work, options of
another method are refused naming it, `--recipe FILE` (YAML/JSON, the model card's fields) with
command-line overrides. The run itself is cut off after validation (no model is read)."""

from __future__ import annotations

import json

import pytest
import typer

from conftest import invoke_cli

# chosen by tests/bench/awq_bench.py (SmolLM2 int4 g128 rows; tests/bench/results/results.md)
CHOSEN_GPTQ_DEFAULTS = {"damp": 0.05, "group_aware": True, "mse": True}


@pytest.fixture()
def recipe_of(monkeypatch, tmp_path):
    """recipe_of(*args) -> the QuantRecipe `qtool quantize` would run (validate_formats is the last
    step before the model is opened), or the failed Result."""
    import qtool.cli.quantize as q

    got = {}

    def capture(recipe, fmt, **kw):
        got["recipe"], got["fmt"] = recipe, fmt
        raise typer.Exit(0)

    monkeypatch.setattr(q, "validate_formats", capture)

    def run(*args):
        got.clear()
        r = invoke_cli("quantize", str(tmp_path / "model"), *args)
        return got.get("recipe") if r.exit_code == 0 and "recipe" in got else r

    return run


def test_old_gptq_spellings_still_work(recipe_of):
    r = recipe_of("-m", "gptq", "--dataset", "x.txt", "--damp", "0.05", "--act-order", "--static-groups", "--block-size", "64")
    assert r.method_params == {"damp": 0.05, "act_order": True, "static_groups": True, "block_size": 64, "group_aware": False,
                               "mse": True, "amp": False}
    assert recipe_of("-m", "gptq", "--dataset", "x.txt").method_params == {"damp": 0.05, "act_order": False, "static_groups": False,
                                                                         "block_size": 128, "group_aware": True, "mse": True,
                                                                         "amp": False}
    assert recipe_of("-m", "gptq", "--dataset", "x.txt", "--amp").method_params["amp"] is True  # shared with autoround


def test_method_defaults_and_options(recipe_of):
    r = recipe_of("-m", "awq", "--dataset", "x.txt", "--alpha-grid", "10", "--no-clip")
    assert r.symmetric is False and r.method_params["alpha_grid"] == 10 and r.method_params["clip"] is False
    assert recipe_of("-m", "awq", "--dataset", "x.txt", "--sym").symmetric is True
    assert recipe_of("-m", "rtn").symmetric is True and recipe_of("-m", "rtn").method_params == {}


@pytest.mark.parametrize("args,words", [
    (("-m", "rtn", "--damp", "0.1"), ("--damp", "not an option of --method rtn")),
    (("-m", "gptq", "--dataset", "x.txt", "--alpha-grid", "5"), ("--alpha-grid", "--method gptq", "--damp")),
    (("-m", "gptq", "--dataset", "x.txt", "--damp", "0"), ("--damp 0",)),
    (("-m", "awq", "--dataset", "x.txt", "--max-shrink", "1.5"), ("--max-shrink 1.5",)),
    (("-m", "gptq", "--dataset", "x.txt", "--act-order", "--group-aware"), ("--act-order", "--group-aware")),
])
def test_bad_method_options_are_usage_errors(recipe_of, args, words):
    r = recipe_of(*args)
    assert not hasattr(r, "method") and r.exit_code == 2, r
    line = r.output.strip()
    assert "\n" not in line and all(w in line for w in words), line


def test_recipe_file_yaml_with_overrides(recipe_of, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: gptq\nqtype: int3\ngroup_size: 64\nstrategy: group\ndataset: calib.txt\nsamples: 16\n"
                 "method_params:\n  damp: 0.05\n", encoding="utf-8")
    r = recipe_of("--recipe", f)
    assert (r.method, r.qtype, r.group_size, r.dataset, r.samples) == ("gptq", "int3", 64, "calib.txt", 16)
    assert r.method_params["damp"] == 0.05
    r = recipe_of("--recipe", f, "--damp", "0.2", "-b", "4", "--samples", "8")
    assert (r.qtype, r.samples, r.method_params["damp"], r.group_size) == ("int4", 8, 0.2, 64)


def test_recipe_as_the_model_card_records_it_round_trips(recipe_of, tmp_path):
    """The card's Recipe section is `json.dumps(recipe.to_dict())`: fed back, the same recipe."""
    from qtool.card import model_card

    first = recipe_of("-m", "awq", "-b", "4", "-g", "128", "--dataset", "c.txt", "--alpha-grid", "8", "--ignore", "*down_proj", "-f", "gptq")
    report = {"recipe": first.to_dict(), "output": "x", "format": "gptq", "params_quantized": 1, "params_total": 1, "bpw_quantized": 4.0}
    card = model_card(report, "base")
    block = card.split("## Recipe", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    f = tmp_path / "card.json"
    f.write_text(block, encoding="utf-8")
    again = recipe_of("--recipe", f)
    assert again.to_dict() == first.to_dict()


@pytest.mark.parametrize("text,words", [
    ('{"method": "awq", "bogus": 1}', ("unknown field 'bogus'",)),
    ('{"method": "awq", "method_params": {"alpha_grid": 0}}', ("--alpha-grid 0",)),
    ('{"method": "rtn", "method_params": {"damp": 0.1}}', ("--damp", "not an option of --method rtn")),
    ("[1, 2", ("not valid JSON",)),
])
def test_bad_recipe_files(recipe_of, tmp_path, text, words):
    f = tmp_path / "r.json"
    f.write_text(text, encoding="utf-8")
    r = recipe_of("--recipe", f)
    assert not hasattr(r, "method") and r.exit_code == 2, r
    assert all(w in r.output for w in words), r.output


def test_gptq_defaults_as_the_model_card_records_them(recipe_of):
    """The GPTQ defaults the bench chose (tests/bench/awq_bench.py) are what a plain `-m gptq` runs and
    what its card's Recipe section records; --act-order alone turns the group-aware default off."""
    from qtool.card import model_card
    from qtool.methods.gptq import GPTQParams

    chosen = {"damp": GPTQParams().damp, "group_aware": GPTQParams().group_aware, "mse": GPTQParams().mse}
    assert chosen == CHOSEN_GPTQ_DEFAULTS
    r = recipe_of("-m", "gptq", "-b", "4", "-g", "128", "--dataset", "c.txt", "-f", "gptq")
    report = {"recipe": r.to_dict(), "output": "x", "format": "gptq", "params_quantized": 1, "params_total": 1, "bpw_quantized": 4.0}
    block = model_card(report, "base").split("## Recipe", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert {k: json.loads(block)["method_params"][k] for k in chosen} == chosen
    assert recipe_of("-m", "gptq", "--dataset", "c.txt", "--act-order").method_params["group_aware"] is False
