"""The reliability corpus: bad inputs and faults a user meets on a real run, each with the exact outcome
it must have — an error naming the file, line and field (or the step and quantity), a warning with its
count (once), or correct handling. No case may end silently with a wrong result.

Grouped as: records (R), tokenization warnings (T), models and tokenizers (M), numerics (N), exports
and checkpoints (C), the command line (L). Tiny models and files; the CLI cases run in-process.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import lightning as L
import pytest
import torch

from rlhf_lightning.callbacks.hf_export import NonFiniteWeightsError, save_hf_directory
from rlhf_lightning.checkpointing import SIGTERM_EXIT_CODE, AtomicCheckpointIO
from rlhf_lightning.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from rlhf_lightning.data.records import RecordError, load_records
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.modules import DPOModule, Optimization
from rlhf_lightning.modules.base import NonFiniteError
from rlhf_lightning.rewards import RewardTransform

from tests.modules.test_reward_model import tiny_trainer

PAIR = {"prompt": "this movie was", "chosen": "great and fun.", "rejected": "bad and boring."}


def write_jsonl(path, rows, raw: bytes | None = None) -> str:
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def record_error(path, kind="pair", tokenizer=None) -> RecordError:
    with pytest.raises(RecordError) as caught:
        load_records(path, kind, tokenizer=tokenizer)
    return caught.value


# ---- R: records -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,field,reason",
    [
        ({"margin": float("nan")}, "margin", "expected a finite number, got nan"),
        ({"margin": float("inf")}, "margin", "expected a finite number, got inf"),
        ({"margin": "high"}, "margin", "expected a number, got str"),
        ({"chosen_scores": {"sentiment": float("nan")}, "rejected_scores": {"sentiment": 0.0}}, "chosen_scores.sentiment",
         "expected a finite number, got nan"),
        ({"chosen": ["great", "fun"]}, "chosen", "expected a string (or a list of {role, content} messages), got a list of str"),
        ({"rejected": 3}, "rejected", "expected a string, got int"),
        ({"chosen": "   "}, "chosen", "must be a non-empty string"),
    ],
    ids=["margin_nan", "margin_infinity", "margin_string", "scores_nan", "list_for_string", "int_for_string", "blank_chosen"],
)
def test_R_bad_pair_field_names_file_line_and_field(tmp_path, bad, field, reason):
    """Before: NaN / Infinity margins (json allows them) were accepted and trained into NaN weights."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, **bad}])
    error = record_error(path)
    assert (error.location.line, error.field, error.reason) == (2, field, reason)
    assert str(error) == f"{path}, line 2: field '{field}': {reason}"


def test_R_non_utf8_bytes_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", [], raw=(json.dumps(PAIR) + "\n").encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    error = record_error(path)
    assert str(error) == f"{path}, line 2: not valid UTF-8 (byte 0xe9 at column 16); re-encode the file as UTF-8"


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero_bytes", "blank_lines"])
def test_R_empty_file_is_an_error_naming_it(tmp_path, content):
    path = write_jsonl(tmp_path / "empty.jsonl", [], raw=content)
    error = record_error(path)
    assert str(error) == f"{path}: the file is empty (nothing but blank lines); expected one JSON object (pair record) per line"


def test_R_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Record file not found: .*nope\.jsonl"):
        load_records(str(tmp_path / "nope.jsonl"), "pair")


def test_R_invalid_json_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIR, '{"prompt": "x",'])
    assert str(record_error(path)).startswith(f"{path}, line 2: invalid JSON (")
    path = write_jsonl(tmp_path / "list.jsonl", [PAIR, ["a", "b"]])
    assert str(record_error(path)) == f"{path}, line 2: expected a JSON object, got list"


def test_R_missing_field_and_columns_in_some_records_only(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "p", "chosen": "c"}])
    assert str(record_error(path)) == f"{path}, line 1: field 'rejected': missing required field"
    path = write_jsonl(tmp_path / "ragged.jsonl", [{**PAIR, "margin": 1.0}, PAIR])
    error = record_error(path)
    assert (error.location.line, error.field) == (2, "margin") and "present in some records but not in others" in error.reason


def test_R_demonstration_completion_list(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": ["a", "b"]}])
    assert str(record_error(path, "demonstration")) == f"{path}, line 1: field 'completion': expected a string, got list"


def test_R_chat_roles_are_checked(tmp_path, tokenizer):
    messages = [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    error = record_error(path, "demonstration", tokenizer)
    assert (error.field, error.location.line) == ("messages[0].role", 1)
    assert error.reason.startswith("unknown role 'human'; expected one of ['system', ") and "map 'human' to 'user'" in error.reason


def test_R_conversation_without_prompt_turns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "reply_only.jsonl", [{"messages": [{"role": "assistant", "content": "hello"}]}])
    error = record_error(path, "demonstration", tokenizer)
    assert error.field == "messages" and error.reason.startswith("the conversation has no prompt turns")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    error = record_error(prompts, "prompt", tokenizer)
    assert error.field == "messages" and error.reason.startswith("the conversation has no prompt turns")


# ---- T: tokenization warnings (once, with counts, at WARNING) -------------------------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("rlhf_lightning.data")]


def _load(datamodule):
    datamodule.setup("fit")
    return datamodule.train_set.data


def test_T_identical_pairs_counted_warned_once_and_droppable(tmp_path, tokenizer_dir, caplog):
    rows = [PAIR, {**PAIR, "rejected": PAIR["chosen"]}, PAIR, {**PAIR, "chosen": "fun.", "rejected": "fun."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        data = _load(PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir))
    assert len(data) == 4 and data.num_identical_pairs == 2
    assert _warnings(caplog) == [
        f"{path}: 2 of 4 preference pairs have identical chosen and rejected tokens (after truncation): kept (they carry "
        "no preference signal); set drop_identical_pairs=True to drop them."
    ]
    assert len(_load(PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, drop_identical_pairs=True))) == 2


def test_T_prompts_longer_than_max_length_warn_about_cut_completions(tmp_path, tokenizer_dir, caplog):
    """Before: with max_prompt_length null every completion was silently cut to its first token (no EOS),
    and a cut pair often became identical."""
    long_prompt = " ".join(["the movie was good and the story was fun"] * 3)  # 30 words
    rows = [{**PAIR, "prompt": long_prompt}] * 3 + [PAIR]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        data = _load(PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, max_length=24))
    assert data.num_short_completions == 3 and len(data) == 4
    assert _warnings(caplog)[0] == (
        f"{path}: truncation left 3 of 4 pair records with a completion shorter than 4 tokens (max_length=24, "
        "max_prompt_length=None): kept; set drop_short_completions=True to drop them. Raise max_length or set max_prompt_length."
    )
    kept = _load(PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, max_length=24, drop_short_completions=True))
    assert len(kept) == 1 and kept.num_dropped == 3


def test_T_unknown_token_rate_is_warned(tmp_path, tokenizer_dir, caplog):
    """Capitalised words and emoji are not in the world tokenizer's vocabulary: all <unk>."""
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Wow", "completion": "Amazing 🎬 Film"}] * 2)
    with caplog.at_level(logging.WARNING):
        data = _load(DemonstrationDataModule(train_file=path, tokenizer=tokenizer_dir))
    assert (data.num_unknown_tokens, data.num_tokens) == (8, 10)  # BOS + 4 words per record; only BOS is known
    assert _warnings(caplog) == [
        f"{path}: 8 of 10 tokens (80.0%) are the tokenizer's unknown token (more than max_unknown_rate=0.01): the text "
        "does not match the tokenizer's vocabulary."
    ]


def test_T_clean_data_gives_no_warning(tokenizer_dir, assets_dir, caplog):
    with caplog.at_level(logging.WARNING):
        for cls, name in ((PreferenceDataModule, "pairs_tiny.jsonl"), (PromptDataModule, "prompts_tiny.jsonl")):
            _load(cls(train_file=os.path.join(assets_dir, name), tokenizer=tokenizer_dir))
    assert _warnings(caplog) == []


# ---- M: models and tokenizers -----------------------------------------------------------------------------


def test_M_model_path_that_does_not_exist(tmp_path, tokenizer_dir):
    missing = str(tmp_path / "outputs" / "sft" / "hf" / "final")
    with pytest.raises(FileNotFoundError, match=rf"^model path does not exist: {missing} "):
        DPOModule(missing)
    with pytest.raises(FileNotFoundError, match=r"^model path does not exist: outputs/nope/hf/final "):
        load_causal_lm("outputs/nope/hf/final")


def test_M_folder_without_tokenizer_files(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(FileNotFoundError, match=r"weights_only has no tokenizer files .* Point `tokenizer:`"):
        DPOModule(str(tmp_path / "weights_only"))


def test_M_pad_id_outside_the_vocabulary(tokenizer_dir, tiny_config):
    tok = load_tokenizer(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<new_pad>"})
    with pytest.raises(ValueError, match=rf"pad_token_id = {len(tok) - 1} \('<new_pad>'\) is outside the vocabulary"):
        load_causal_lm({**tiny_config, "vocab_size": len(tok) - 1}, tokenizer=tok)


# ---- N: numerics ------------------------------------------------------------------------------------------------


def _dpo(tiny_config, tokenizer_dir, **kwargs):
    torch.manual_seed(0)
    return DPOModule(tiny_config, tokenizer_dir, **kwargs)


def _fit(module, tmp_path, tokenizer_dir, assets_dir, **kwargs):
    L.seed_everything(0)
    kwargs.setdefault("max_steps", 3)
    trainer = tiny_trainer(tmp_path, **kwargs)
    trainer.fit(module, datamodule=PreferenceDataModule(
        train_file=os.path.join(assets_dir, "pairs_tiny.jsonl"), tokenizer=tokenizer_dir, batch_size=4))
    return trainer


def test_N_learning_rate_far_too_high_stops_with_step_and_quantity(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = _dpo(tiny_config, tokenizer_dir, optim=Optimization(lr=1e30, warmup_steps=0))
    with pytest.raises(NonFiniteError, match=r"^Non-finite loss \(nan\) at global step 1 \(epoch 0\) in DPOModule: stopping"):
        _fit(module, tmp_path, tokenizer_dir, assets_dir)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_N_skip_mode_drops_non_finite_steps(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = _dpo(tiny_config, tokenizer_dir, optim=Optimization(lr=1e30, warmup_steps=0), on_nonfinite="skip")
    _fit(module, tmp_path, tokenizer_dir, assets_dir)
    assert module.nonfinite_skipped_steps == 2 and all(torch.isfinite(p).all() for p in module.parameters())


def test_N_reward_scaling_of_an_equal_score_first_rollout():
    """Before: scale by 1 / (0 + 1e-8): every reward became 5e7."""
    out = RewardTransform(normalize="scale")(torch.full((32,), 0.5))
    assert torch.equal(out, torch.full((32,), 0.5))


# ---- C: exports and checkpoints ------------------------------------------------------------------------------------


def test_C_nan_weights_never_replace_a_good_export(tmp_path, tiny_model, tokenizer):
    target = tmp_path / "hf" / "final"
    save_hf_directory(tiny_model, tokenizer, str(target))
    before = (target / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(tiny_model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="previous export at .* is kept"):
        save_hf_directory(tiny_model, tokenizer, str(target))
    assert (target / "model.safetensors").read_bytes() == before and sorted(os.listdir(tmp_path / "hf")) == ["final"]


def test_C_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, str(path))

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, str(path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_C_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Before: SIGTERM stopped the run with exit status 0 and no checkpoint at the stop."""
    import signal

    class Preempt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    module = _dpo(tiny_config, tokenizer_dir)
    with pytest.raises(SystemExit) as stopped:
        _fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=6, callbacks=[Preempt()])
    assert stopped.value.code == SIGTERM_EXIT_CODE == 143
    saved = torch.load(tmp_path / "checkpoints" / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    resumed = _dpo(tiny_config, tokenizer_dir)
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(resumed, datamodule=PreferenceDataModule(
        train_file=os.path.join(assets_dir, "pairs_tiny.jsonl"), tokenizer=tokenizer_dir, batch_size=4),
        ckpt_path=str(tmp_path / "checkpoints" / "preempted.ckpt"))
    assert trainer.global_step == 3


# ---- L: the command line (in-process; exit status and the one-line message) -------------------------------------------


def _cli_args(root, tokenizer_dir, tiny_config, train_file, *extra):
    return [
        "fit", "--config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "dpo.yaml"),
        f"--model.init_args.model={json.dumps(tiny_config)}", f"--model.init_args.tokenizer={tokenizer_dir}",
        f"--data.init_args.train_file={train_file}", f"--data.init_args.val_file={train_file}", "--data.init_args.batch_size=4",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
        f"--run_dir={root}", *extra,
    ]


def _cli(args, capsys) -> tuple[int, str]:
    from rlhf_lightning.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(args)
    return stopped.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tokenizer_dir, assets_dir, tiny_config):
    """One good tiny DPO run through the CLI: its checkpoint and export are what the cases below misuse."""
    from rlhf_lightning.cli import main

    root = tmp_path_factory.mktemp("cli_run")
    main(_cli_args(root, tokenizer_dir, tiny_config, os.path.join(assets_dir, "pairs_tiny.jsonl"),
                   "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--trainer.callbacks.save_last=true"))
    return root


def test_L_nan_margin_record_exits_1_with_file_line_field_and_no_export(tmp_path, tokenizer_dir, tiny_config, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "margin": float("nan")}])
    code, err = _cli(_cli_args(tmp_path / "run", tokenizer_dir, tiny_config, path), capsys)
    assert code == 1
    assert err.strip().endswith(f"rlhf-lightning: error: RecordError: {path}, line 2: field 'margin': expected a finite number, got nan")
    assert not (tmp_path / "run" / "hf").exists()


def test_L_learning_rate_far_too_high_exits_1_and_keeps_the_good_export(cli_run, tmp_path, tokenizer_dir, assets_dir, tiny_config, capsys):
    """Before: NaN loss, exit 0, and hf/final overwritten with NaN weights."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(cli_run / "hf", root / "hf")
    good = (root / "hf" / "final" / "model.safetensors").read_bytes()
    code, err = _cli(_cli_args(root, tokenizer_dir, tiny_config, os.path.join(assets_dir, "pairs_tiny.jsonl"),
                               "--model.init_args.optim.lr=1e30", "--model.init_args.optim.warmup_steps=0",
                               "--trainer.gradient_clip_val=null"), capsys)
    assert code == 1 and "rlhf-lightning: error: NonFiniteError: Non-finite loss (nan) at global step 1" in err
    assert (root / "hf" / "final" / "model.safetensors").read_bytes() == good


def test_L_missing_empty_and_corrupt_checkpoints(cli_run, tmp_path, tokenizer_dir, assets_dir, tiny_config, capsys):
    pairs = os.path.join(assets_dir, "pairs_tiny.jsonl")
    missing = tmp_path / "nope.ckpt"
    code, err = _cli(_cli_args(tmp_path / "a", tokenizer_dir, tiny_config, pairs, f"--ckpt_path={missing}"), capsys)
    assert code == 1 and f"CheckpointError: Checkpoint file not found: {missing}" in err
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    code, err = _cli(_cli_args(tmp_path / "b", tokenizer_dir, tiny_config, pairs, f"--ckpt_path={empty}"), capsys)
    assert code == 1 and f"CheckpointError: Checkpoint file {empty} is empty (0 bytes)" in err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((cli_run / "ckpt" / "last.ckpt").read_bytes()[:1000])
    code, err = _cli(_cli_args(tmp_path / "c", tokenizer_dir, tiny_config, pairs, f"--ckpt_path={corrupt}"), capsys)
    assert code == 1 and f"CheckpointError: Checkpoint file {corrupt} cannot be read" in err


def test_L_checkpoint_of_another_module_class(cli_run, tmp_path, tokenizer_dir, assets_dir, tiny_config, capsys):
    args = _cli_args(tmp_path, tokenizer_dir, tiny_config, os.path.join(assets_dir, "pairs_tiny.jsonl"),
                     f"--ckpt_path={cli_run / 'ckpt' / 'last.ckpt'}")
    args[2] = args[2].replace("dpo.yaml", "reward_model.yaml")
    code, err = _cli(args, capsys)
    assert code == 1
    assert "was written by rlhf_lightning.modules.DPOModule, but this run's model is rlhf_lightning.modules.RewardModelModule" in err


def test_L_resume_reports_settings_that_differ_and_which_value_wins(cli_run, tmp_path, tokenizer_dir, assets_dir, tiny_config, caplog):
    """Before: --model.init_args.* overrides on a resume were silently replaced by the checkpoint's."""
    from rlhf_lightning.cli import main

    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    label_smoothing: 0.2\n")
    args = _cli_args(tmp_path / "run", tokenizer_dir, tiny_config, os.path.join(assets_dir, "pairs_tiny.jsonl"),
                     "--config", str(override), "--model.init_args.beta=0.5", f"--ckpt_path={cli_run / 'ckpt' / 'last.ckpt'}",
                     "--trainer.max_steps=3")
    with caplog.at_level(logging.WARNING):
        cli = None
        from rlhf_lightning.cli import cli_main

        cli = cli_main(args)
    text = caplog.text
    assert "label_smoothing: checkpoint 0.0, this run's config 0.2 -> the checkpoint's value is used" in text
    assert "beta: checkpoint 0.1, this run 0.5 -> this run's value is used" in text
    assert cli.model.beta == 0.5 and cli.model.label_smoothing == 0.0
    del main
