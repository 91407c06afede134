"""tools/export_model.py on tiny models of every family: the exported folder has the base folder's tensor names,
shapes and config (THUDM's `auto_map` kept), gives the unmerged checkpoint's logits and greedy tokens on our model
classes (and on transformers' own class for the transformers-layout families), predicts and chats as the checkpoint
does, its INT4 form equals tools/quantize_model.py's quantization of the fp16 export, its LoRA form is PEFT's two
files; and bad input gets one line with nothing left behind."""
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, launch, predict_in_process

LORA_CHECKPOINTS = ["chatglm", "chatglm2", "chatglm3", "glm4", "glm4-hf", "glm4-0414"]


def checkpoint_of(trained, trained_families, family, mode="lora"):
    out = trained[mode] if family == "chatglm" else trained_families[family, mode][0]
    with open(os.path.join(out, "latest")) as f:
        return os.path.join(out, f.read().strip())


def export(*args):
    from tools.export_model import main
    main([str(a) for a in args])


def base_of(checkpoint):
    with open(os.path.join(checkpoint, "training_args.json")) as f:
        return json.load(f)["model_dir"]


def logits_and_tokens(model, ids):
    from decoding import greedy_decode
    with torch.no_grad():
        return model(input_ids=ids).logits, greedy_decode(model, ids, torch.ones_like(ids), 8, [])


def prompt(folder):
    from model_family import family_for, load_tokenizer
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    return torch.tensor([family.build_prompt_ids(tokenizer, tokenizer.encode("发动机异响", add_special_tokens=False))])


@pytest.mark.parametrize("family", LORA_CHECKPOINTS)
def test_a_merged_lora_export_is_the_base_folder_with_the_checkpoints_function(trained, trained_families,
                                                                                family, tmp_path):
    from checkpoints import weight_shapes
    from model_family import family_for, load_model
    from predict_lora import LoRAPredict
    checkpoint = checkpoint_of(trained, trained_families, family)
    base, out = base_of(checkpoint), tmp_path / "export"
    export("--checkpoint", checkpoint, "--output_dir", out, "--dtype", "fp32", "--max_shard_size", "200KB")
    assert weight_shapes(str(out)) == weight_shapes(base)  # every name and shape of the base, nothing else
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1  # sharded, with its index
    with open(os.path.join(base, "config.json")) as f, open(out / "config.json") as g:
        base_config, config = json.load(f), json.load(g)
    assert {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")} == \
        {k: v for k, v in base_config.items() if k not in ("torch_dtype", "dtype")}  # auto_map and all
    tokenizer_file = family_for(base).tokenizer_file
    assert (out / tokenizer_file).is_file() and (out / "generation_config.json").is_file()
    readme = (out / "README.md").read_text()
    assert "method: lora" in readme and os.path.abspath(base) in readme
    assert not [n for n in os.listdir(out) if n.endswith((".pt", ".bin", ".pkl")) or n == "ds_state"]
    ids = prompt(base)
    unmerged = LoRAPredict().load(base, checkpoint, argparse_namespace(no_merge=True), family_for(base),
                                  torch.float32).eval()
    expected_logits, expected_tokens = logits_and_tokens(unmerged, ids)
    logits, tokens = logits_and_tokens(load_model(str(out)).eval(), ids)
    assert (logits - expected_logits).abs().max() <= 1e-3 and tokens.tolist() == expected_tokens.tolist()
    if family in ("glm4-hf", "glm4-0414"):  # transformers' own class loads it as its own folder
        from transformers import AutoModelForCausalLM
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(theirs).__module__.startswith("transformers.models.")
        with torch.no_grad():
            assert (theirs(input_ids=ids).logits - expected_logits).abs().max() <= 1e-3


def argparse_namespace(**values):
    import argparse
    return argparse.Namespace(**{"no_merge": False, "quantization_bit": None, "quantization": None, **values})


@pytest.mark.parametrize("family, mode", [("chatglm", "freeze"), ("glm4-hf", "freeze"), ("glm4-0414", "full")])
def test_freeze_and_full_exports_give_the_checkpoints_logits(trained, trained_families, family, mode, tmp_path):
    from checkpoints import weight_shapes
    from model_family import load_model
    from prediction import load_partial_state
    checkpoint = checkpoint_of(trained, trained_families, family, mode)
    base, out = base_of(checkpoint), tmp_path / "export"
    export("--checkpoint", checkpoint, "--output_dir", out, "--dtype", "fp32")
    assert weight_shapes(str(out)) == weight_shapes(base)
    if mode == "full":
        reference = load_model(checkpoint)
    else:
        reference = load_model(base)
        load_partial_state(reference, checkpoint)
    ids = prompt(base)
    expected, expected_tokens = logits_and_tokens(reference.eval(), ids)
    logits, tokens = logits_and_tokens(load_model(str(out)).eval(), ids)
    assert (logits - expected).abs().max() <= 1e-3 and tokens.tolist() == expected_tokens.tolist()


def test_predict_and_chat_on_the_export_answer_as_the_checkpoint(trained_families, few_rows, tmp_path):
    checkpoint = checkpoint_of({}, trained_families, "glm4-0414")
    out = tmp_path / "export"
    export("--checkpoint", checkpoint, "--output_dir", out, "--dtype", "fp32")
    predict_in_process("predict_lora.py", "--model_dir", checkpoint, "--test_path", few_rows, "--output_dir",
                       tmp_path / "from-checkpoint", "--device", "cpu")
    with open(os.path.join(checkpoint, "training_args.json")) as f:
        prompt_text = json.load(f)["prompt_text"]
    predict_in_process("predict_full.py", "--model_dir", out, "--test_path", few_rows,
                       "--output_dir", tmp_path / "from-export", "--device", "cpu", "--prompt_text", prompt_text,
                       "--max_len", 128, "--max_src_len", 100)

    def generations(folder):
        with open(folder / "predictions.jsonl") as f:
            return [json.loads(line)["generated"] for line in f]
    assert generations(tmp_path / "from-export") == generations(tmp_path / "from-checkpoint")
    assert json.loads((tmp_path / "from-export" / "metrics.json").read_text())["f1"] >= 0.9
    turns = tmp_path / "turns.jsonl"
    turns.write_text(json.dumps({"query": "发动机异响"}, ensure_ascii=False) + "\n", encoding="utf-8")
    answers = [json.loads(launch("chat.py", "--model_dir", folder, "--input", turns, "--greedy", "--device", "cpu",
                                 "--max_new_tokens", 12, "--format", "chat", launcher=False).stdout.splitlines()[-1])
               for folder in (checkpoint, out)]
    assert answers[0] == answers[1]


def test_the_int4_export_equals_quantizing_the_fp16_export(trained_families, tmp_path):
    from safetensors.torch import load_file

    from tools.quantize_model import quantize_folder
    checkpoint = checkpoint_of({}, trained_families, "chatglm2")
    export("--checkpoint", checkpoint, "--output_dir", tmp_path / "int4", "--quantization_bit", 4)
    export("--checkpoint", checkpoint, "--output_dir", tmp_path / "fp16", "--dtype", "fp16")
    quantize_folder(str(tmp_path / "fp16"), 4, str(tmp_path / "reference"))
    ours, reference = load_file(tmp_path / "int4" / "model.safetensors"), \
        load_file(tmp_path / "reference" / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_bit"] == 4
    assert "INT4" in (tmp_path / "int4" / "README.md").read_text()


def test_the_lora_form_is_peft_s_two_files(trained_families, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    checkpoint = checkpoint_of({}, trained_families, "glm4-hf")
    out = tmp_path / "adapter"
    export("--checkpoint", checkpoint, "--output_dir", out, "--format", "lora")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "--enable-lora" in (out / "README.md").read_text()
    base = base_of(checkpoint)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert {"q_proj", "k_proj", "v_proj"} <= set(model.peft_config["default"].target_modules)


def one_line_error(capsys, *args):
    with pytest.raises(SystemExit) as caught:
        export(*args)
    message = str(caught.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_bad_input_is_one_line_and_leaves_nothing(trained, trained_families, tmp_path, capsys, monkeypatch):
    lora = checkpoint_of(trained, trained_families, "glm4-0414")
    assert "cannot be merged" in one_line_error(capsys, "--checkpoint", checkpoint_of(trained, trained_families,
                                                                                      "glm4-0414", "pt2"),
                                                "--output_dir", tmp_path / "a")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert "--overwrite" in one_line_error(capsys, "--checkpoint", lora, "--output_dir", tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    import shutil as shutil_module
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10, 10, 1000))
    assert "GiB free" in one_line_error(capsys, "--checkpoint", lora, "--output_dir", tmp_path / "b")
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "b.tmp")
    # a base that moved, and one that changed since training
    copy = tmp_path / "checkpoint"
    shutil.copytree(lora, copy)
    saved = json.loads((copy / "training_args.json").read_text())
    (copy / "training_args.json").write_text(json.dumps({**saved, "model_dir": str(tmp_path / "gone")}))
    from checkpoints import write_manifest
    write_manifest(str(copy))  # an edit of ours, not damage
    assert "--ori_model_dir" in one_line_error(capsys, "--checkpoint", copy, "--output_dir", tmp_path / "c")
    changed = tmp_path / "changed-base"
    shutil.copytree(saved["model_dir"], changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    message = one_line_error(capsys, "--checkpoint", lora, "--ori_model_dir", changed, "--output_dir", tmp_path / "d")
    assert "config.json changed" in message
    assert not os.path.exists(tmp_path / "d")


def test_the_script_runs_as_a_command(trained, tmp_path):
    with open(os.path.join(trained["lora"], "latest")) as f:
        checkpoint = os.path.join(trained["lora"], f.read().strip())
    result = launch("tools/export_model.py", "--checkpoint", checkpoint, "--output_dir", tmp_path / "out",
                    launcher=False)
    assert "wrote" in result.stdout and os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    assert ROOT
