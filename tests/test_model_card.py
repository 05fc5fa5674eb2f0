"""Model cards: every folder `build`, `train`, `merge` and `convert` write has a README.md rendered from its own
records, whose figures are the run's (train_result.json, the eval JSON), rewritten by `n2eye eval --model DIR`,
and a README.md N2-Eye did not write is never replaced."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_train import run_train, write_messages_dataset

from n2eye.model_card import MARKER

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colours" / "train.jsonl"
FRONT_MATTER = {
    "library_name": "transformers",
    "pipeline_tag": "image-text-to-text",
    "tags": ["n2eye", "lfm2", "siglip"],
}


def load_card(folder: Path) -> ModelCard:
    """The folder's card through huggingface_hub's own parser (YAML front matter -> `.data`)."""
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    for key, value in FRONT_MATTER.items():
        if key != "library_name":
            assert data[key] == value, key
    assert MARKER in card.text
    return card


def row(text: str, label: str) -> list[str]:
    """The cells after `label` in the card's table row `| label | ... |`."""
    match = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", text, re.MULTILINE)
    assert match, f"no row {label!r} in the card"
    return [cell.strip() for cell in match.group(1).split("|")]


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory) -> Path:
    """A short full run on data with bad rows (so skips are counted) and abstention, then out/final."""
    data = write_messages_dataset(tmp_path_factory.mktemp("data"), n=6, bad_rows=True)
    return run_train(tiny_checkpoint, data, tmp_path_factory.mktemp("run") / "run", max_steps=4, abstain_fraction=0.5)


def test_a_built_checkpoint_has_a_card_with_its_parameter_counts(tiny_checkpoint):
    card = load_card(tiny_checkpoint)
    assert card.data.library_name == "transformers"
    build = json.loads((tiny_checkpoint / "n2eye_build.json").read_text())
    counts = build["parameters"]
    for part, key in (("language model", "language_model"), ("vision encoder", "vision_tower"),
                      ("projector", "projector"), ("total", "total")):  # fmt: skip
        assert row(card.text, part) == [f"{counts[key]:,}"]
    assert f"`{build['sources']['lm']}`" in card.text and f"`{build['sources']['vision']}`" in card.text
    assert card.data.base_model is None  # the tiny backbones are local folders, not hub ids
    assert "Not trained yet" in card.text
    assert f'model_id = "{tiny_checkpoint.resolve()}"' in card.text


def test_a_trained_card_has_the_runs_figures(trained):
    result = json.loads((trained.parent / "train_result.json").read_text())
    record = json.loads((trained / "n2eye_train.json").read_text())
    assert {k: v for k, v in record.items() if k != "hub_datasets"} == result and record["hub_datasets"] == []
    assert (trained / "n2eye_build.json").is_file()  # the base's build record travels with the weights
    card = load_card(trained)
    text = card.text
    assert text.lstrip().startswith(f"# {trained.parent.name}/final\n")  # titled after its run
    assert row(text, "steps") == [str(result["global_step"])] and result["global_step"] == 4
    assert row(text, "final train loss") == [f"{result['final_train_loss']:.4f}"]
    skipped = result["skipped"]
    assert skipped["skipped"] == 3 and skipped["kept"] == 6
    assert f"- Rows: {skipped['kept']} kept, {skipped['skipped']} skipped (" in text
    for reason, n in skipped["reasons"].items():
        assert f"{reason} {n}" in text
    assert (
        f"training rows: {result['train_rows']}" in text
        and f"Conversations read: {result['train_conversations']}" in text
    )
    config = result["config"]
    assert f"({result['abstention_conversations']} conversations)" in text and result["abstention_conversations"] > 0
    assert row(text, "learning rate") == [f"{config['lr']:g}"] and row(text, "epochs") == [f"{config['epochs']:g}"]
    assert row(text, "batch size (per device)") == [str(config["batch_size"])]
    assert row(text, "gradient accumulation") == [str(config["grad_accum"])]
    assert row(text, "max length (tokens)") == [f"{config['max_length']:,}"]
    assert row(text, "precision") == ["float32"] and row(text, "mode") == ["full"]
    assert row(text, "trainable: language model") == [f"{result['trainable_parameters']['language_model']:,}"]
    assert "Not trained yet" not in text and "n2eye train --train full" in text


def test_eval_records_its_result_in_the_checkpoint_and_rerenders_the_card(trained, tmp_path):
    from n2eye.cli import main

    before = (trained / "README.md").read_text()
    assert "No evaluation recorded" in before
    results = {}
    for kind, flags in (("exact", []), ("exact+blank-images", ["--blank-images"])):  # the demo's pair of evals
        out = tmp_path / f"{kind}.json"
        argv = ["eval", "--model", str(trained), "--data", str(EXAMPLES), "--out", str(out), "--max-new-tokens", "4"]
        assert main([*argv, *flags]) == 0
        results[kind] = result = json.loads(out.read_text())
        record = json.loads((trained / "n2eye_eval.json").read_text())["evals"][kind]
        assert record["overall"] == result["overall"] and record["per_type"] == result["per_type"]
        assert record["n"] == result["n"] == 16 and "predictions" not in record
        assert record["result_file"] == str(out.resolve()) and record["config"]["data"] == str(EXAMPLES)
    text = load_card(trained).text
    real, blank = text.split("### Exact match (blank images)")  # the plain eval first, the baseline kept too
    for part, result in ((real, results["exact"]), (blank, results["exact+blank-images"])):
        assert f"Exact match: overall {result['overall']:.4f}" in part and f"macro {result['macro']:.4f}" in part
        for qtype, stats in result["per_type"].items():
            assert row(part, qtype) == [str(stats["n"]), f"{stats['mean_score']:.4f}"]
        assert set(result["per_type"]) == {"colour", "shape"}
    assert row(text, "steps") == [str(json.loads((trained / "n2eye_train.json").read_text())["global_step"])]


def test_the_usage_snippet_of_a_card_runs(trained, image_path):
    text = (trained / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1).replace("photo.jpg", str(image_path))
    scope: dict = {}
    exec(code.replace("print(", "answer = ("), scope)  # noqa: S102 - the card's own snippet, on the tiny model
    assert isinstance(scope["answer"], str)


def test_a_crag_mm_result_is_recorded_with_its_truthfulness(tiny_checkpoint, tmp_path):
    from n2eye.eval.crag_protocol import aggregate
    from n2eye.model_card import record_eval

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    verdicts = ["correct", "hallucination", "missing", "correct", "early_stop"]
    turns = [{"session_id": f"s{i // 3}", "verdict": v, "judged_verdict": "missing" if v == "early_stop" else v,
              "is_exact_match": v == "correct", "domain": ["food", "plants"][i % 2], "query_category": "simple",
              "image_quality": "normal", "is_ego": i < 2} for i, v in enumerate(verdicts)]  # fmt: skip
    result = {"protocol": "crag-mm", "judge": None, "note": "no judge: hallucinations are an upper bound",
              "max_answer_tokens": 75, **aggregate(turns), "config": {"data": "crag.parquet", "protocol": "crag-mm"},
              "turns": turns}  # fmt: skip
    assert record_eval(folder, result, tmp_path / "crag.json") == folder / "n2eye_eval.json"
    text = load_card(folder).text
    overall = result["overall"]
    assert row(text, "overall")[:4] == [str(overall[k]) for k in ("n", "correct", "missing", "hallucination")]
    assert row(text, "overall")[6] == f"{overall['truthfulness']:.4f}"
    for domain, metrics in result["per_domain"].items():
        assert row(text, domain)[6] == f"{metrics['truthfulness']:.4f}"
    record = json.loads((folder / "n2eye_eval.json").read_text())["evals"]["crag-mm"]
    assert record["overall"] == overall and "turns" not in record
    assert "hallucinations are an upper bound" in text and "no LLM judge" in text


def test_a_readme_n2eye_did_not_write_is_left_alone(tiny_checkpoint, tmp_path, capsys):
    from n2eye.model_card import record_eval

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (folder / "README.md").write_text("# My notes\n")
    result = {"per_type": {"all": {"n": 1, "mean_score": 1.0}}, "overall": 1.0, "macro": 1.0, "n": 1}
    record_eval(folder, result, tmp_path / "r.json")
    assert (folder / "README.md").read_text() == "# My notes\n"  # no marker: someone else's
    assert json.loads((folder / "n2eye_eval.json").read_text())["evals"]["exact"]["overall"] == 1.0  # still kept
    assert "not written by N2-Eye" in capsys.readouterr().out
    (folder / "README.md").write_text(f"old card\n{MARKER}\n")  # N2-Eye's own (older) card is rewritten
    record_eval(folder, result, tmp_path / "r.json")
    assert "Exact match: overall 1.0000" in (folder / "README.md").read_text()


def test_an_eval_that_cannot_write_its_record_warns_and_still_succeeds(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from n2eye import model_card
    from n2eye.eval.runner import EvalConfig, evaluate

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")

    def refuse(path, payload):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(model_card, "write_json_atomic", refuse)
    result = evaluate(EvalConfig(model=str(folder), data=str(EXAMPLES), out=str(tmp_path / "r.json"), max_new_tokens=2,
                                 max_samples=1))  # fmt: skip
    assert result["n"] == 2 and json.loads((tmp_path / "r.json").read_text())["n"] == 2
    assert "warning: could not record this eval" in capsys.readouterr().out
    assert not (folder / "n2eye_eval.json").exists() and "No evaluation recorded" in (folder / "README.md").read_text()


def test_lora_adapter_and_merged_folders_have_cards(tiny_checkpoint, tmp_path):
    from n2eye.train.merge import MergeConfig, merge

    data = write_messages_dataset(tmp_path / "data", n=4)
    run_train(tiny_checkpoint, data, tmp_path / "lora", max_steps=2, train="lora", lora_r=4)
    adapter = tmp_path / "lora" / "adapter"
    card = load_card(adapter)  # PEFT's template README replaced by the run's card
    assert card.data.library_name == "peft" and "n2eye merge --adapter" in card.text
    merged = merge(MergeConfig(adapter=str(adapter), out=str(tmp_path / "merged")))
    result = json.loads((tmp_path / "lora" / "train_result.json").read_text())
    text = load_card(merged).text
    assert "`n2eye merge`: LoRA adapter" in text and "n2eye train --train lora" in text
    assert row(text, "steps") == [str(result["global_step"])]
    assert row(text, "final train loss") == [f"{result['final_train_loss']:.4f}"]
    assert row(text, "LoRA r / alpha / dropout") == ["4 / 32 / 0.05"]
    assert {p.name for p in merged.iterdir()} >= {"n2eye_build.json", "n2eye_train.json", "n2eye_merge.json"}


def test_convert_import_and_native_export_have_cards(tmp_path):
    from transformers import Lfm2VlForConditionalGeneration

    from n2eye.convert import ConvertConfig, convert
    from n2eye.fixtures.lfm2vl import make_tiny_lfm2vl

    source = make_tiny_lfm2vl(tmp_path / "LFM2-VL-tiny")
    imported, report = convert(ConvertConfig(model=str(source), to="n2eye", out=str(tmp_path / "eye")))
    text = load_card(imported).text
    assert f"`n2eye convert --to n2eye` from `{source}`" in text and "Not trained by N2-Eye" in text
    assert row(text, "total") == [f"{report['parameters']:,}"]
    exported, report = convert(ConvertConfig(model=str(imported), to="lfm2-vl", out=str(tmp_path / "native")))
    card = load_card(exported)
    assert "trust_remote_code" not in card.text and "transformers Lfm2Vl (native" in card.text
    assert row(card.text, "total") == [f"{report['parameters']:,}"]
    again, _ = convert(ConvertConfig(model=str(imported), to="lfm2-vl", out=str(exported)))  # README: still replaceable
    assert again == exported and (again / "README.md").is_file()
    Lfm2VlForConditionalGeneration.from_pretrained(exported)  # a README changes nothing for a plain load


def test_hub_sources_give_base_models_license_and_datasets(tiny_checkpoint, tmp_path):
    from n2eye.model_card import hub_dataset_ids, license_of, render_card

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    build = json.loads((folder / "n2eye_build.json").read_text())
    build["sources"] = {"lm": "LiquidAI/LFM2-1.2B", "vision": "google/siglip2-so400m-patch14-384", "random_init": False}
    (folder / "n2eye_build.json").write_text(json.dumps(build))
    specs = f"crag-mm-2025/crag-mm-multi-turn-public:validation, {EXAMPLES}"
    assert hub_dataset_ids(specs) == ["crag-mm-2025/crag-mm-multi-turn-public"]
    (folder / "n2eye_train.json").write_text(
        json.dumps({"config": {"data": specs}, "hub_datasets": hub_dataset_ids(specs)})
    )
    (folder / "README.md").write_text(render_card(folder, model_id="owner/n2eye-test"))  # as published
    card = load_card(folder)
    assert card.text.startswith("\n# owner/n2eye-test\n") and 'model_id = "owner/n2eye-test"' in card.text
    data = card.data
    assert data.base_model == ["LiquidAI/LFM2-1.2B", "google/siglip2-so400m-patch14-384"]
    assert (data.license, data.to_dict()["license_name"]) == ("other", "lfm1.0")
    assert data.datasets == ["crag-mm-2025/crag-mm-multi-turn-public"]
    assert license_of(["google/siglip2-base-patch16-naflex"]) == ("apache-2.0", None)
    assert license_of(["google/siglip2-base-patch16-naflex", "/my/own/lm"]) == (None, None)  # unknown: no license
    build["sources"]["random_init"] = True  # the shapes only: nothing was fine-tuned from them
    (folder / "n2eye_build.json").write_text(json.dumps(build))
    (folder / "README.md").write_text(render_card(folder))
    data = load_card(folder).data
    assert data.base_model is None and data.license is None


def test_a_gguf_export_has_a_card_with_its_files_and_llamacpp_usage(tiny_checkpoint, tmp_path):
    pytest.importorskip("gguf")
    from n2eye.convert import ConvertConfig, convert

    out, report = convert(
        ConvertConfig(model=str(tiny_checkpoint), to="gguf", out=str(tmp_path / "gguf"), quant="q8_0")
    )
    card = load_card(out)
    assert card.data.library_name == "gguf"
    lm = report["language_model"]
    assert row(card.text, "language model") == [lm["file"], str(lm["tensors"]), ", ".join(lm["types"])]
    assert f"llama-cli -m {out}/{lm['file']}" in card.text and report["mmproj_skipped"] in card.text
    assert (out / "n2eye_build.json").read_text() == (tiny_checkpoint / "n2eye_build.json").read_text()
