"""Session fixtures: one tiny tokenizer and one tiny Llama-style config shared by every test."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread per process: the models here are tiny, and with several processes (DDP tests,
# CI's 2 cores) OpenMP threads spin-wait against each other — measured 25x slower steps with 2 threads
# under contention. Set before torch spawns its pool; subprocesses inherit the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

TEST_WORDS = (
    "the a movie film story actor actors plot was is were great good bad awful boring fun loved hated "
    "it this that and but i we they very really not so acting music ending scenes review stars star "
    "one two three four five genre comedy drama horror action funny scary sad slow fast long short"
).split()

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_word_level_tokenizer(TEST_WORDS, path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(tokenizer_dir, padding_side="right")


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """Inline config dict (copy it before mutating)."""
    return dict(TINY_LLAMA)


@pytest.fixture()
def tiny_model(tokenizer, tiny_config):
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(tiny_config, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def assets_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "assets")


# ---- the embedded world, shared by the learning tests (marked slow) ----------------------------
# One small world, one SFT policy and one sentiment reward model per session, trained through the
# very configs and CLI the pipeline uses, only shortened.

SMALL_POLICY_ARGS = [
    "--model.init_args.model.hidden_size=64",
    "--model.init_args.model.intermediate_size=192",
    "--model.init_args.model.num_hidden_layers=2",
    "--model.init_args.model.num_attention_heads=4",
    "--model.init_args.model.num_key_value_heads=4",
]


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> str:
    from rlhf_lightning.synthetic import write_world

    path = tmp_path_factory.mktemp("world")
    write_world(path, seed=0, n_demonstrations=3000, n_val_demonstrations=200, n_pairs=2000, n_val_pairs=300,
                n_prompts=300, n_eval_prompts=100, label_noise=0.1)
    return str(path)


@pytest.fixture(scope="session")
def sft_policy_dir(world_dir, tmp_path_factory) -> str:
    from rlhf_lightning.pipeline import fit_stage

    stage = tmp_path_factory.mktemp("sft")
    export = fit_stage(
        "sft.yaml",
        stage,
        [
            f"--model.init_args.tokenizer={world_dir}/tokenizer",
            *SMALL_POLICY_ARGS,
            f"--data.init_args.train_file={world_dir}/sft_train.jsonl",
            f"--data.init_args.val_file={world_dir}/sft_val.jsonl",
            "--trainer.max_steps=400",
            "--trainer.val_check_interval=200",
            "--trainer.limit_val_batches=4",
            "--model.init_args.optim.lr=5e-3",
        ],
        quiet=True,
    )
    return str(export)


@pytest.fixture(scope="session")
def rm_dir(world_dir, sft_policy_dir, tmp_path_factory) -> str:
    from rlhf_lightning.pipeline import fit_stage

    stage = tmp_path_factory.mktemp("reward_model")
    export = fit_stage(
        "reward_model.yaml",
        stage,
        [
            f"--model.init_args.model={sft_policy_dir}",
            f"--model.init_args.tokenizer={world_dir}/tokenizer",  # the config names outputs/world's
            "--model.init_args.optim.lr=5e-4",  # the config's 1e-3 is for its from-scratch RM, not an SFT start
            f"--data.init_args.train_file={world_dir}/pairs_sentiment_train.jsonl",
            f"--data.init_args.val_file={world_dir}/pairs_sentiment_val.jsonl",
            "--trainer.max_steps=150",
        ],
        quiet=True,
    )
    return str(export)


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory) -> dict:
    """One ``rlhf-lightning pipeline --tiny`` run through the console script (every stage, a few steps each),
    shared by tests/test_pipeline.py and tests/test_notebook.py. Returns ``run_dir``, ``output`` (stdout
    and stderr) and ``seconds`` (wall time of the command)."""
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    script = Path(sys.executable).with_name("rlhf-lightning")
    command = [str(script)] if script.exists() else [shutil.which("rlhf-lightning") or "rlhf-lightning"]
    started = time.perf_counter()
    completed = subprocess.run([*command, "pipeline", "--run-dir", str(run_dir), "--tiny"], capture_output=True,
                               text=True, timeout=900)
    seconds = time.perf_counter() - started
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"rlhf-lightning pipeline --tiny failed:\n{output[-6000:]}"
    return {"run_dir": run_dir, "output": output, "seconds": seconds}


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (scripts are not a package), for tests of its functions."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- a byte-level BPE tokenizer with pad == eos and a ChatML template ------------------------------
# What Hub chat models look like (GPT-2 / Qwen2 style): byte-level BPE, no pad token of its own (so the
# loader sets pad = eos), an end-of-turn token that is not EOS.

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_bpe_tokenizer(path, *, chat_template: str | None = CHATML_TEMPLATE) -> str:
    """Train a small byte-level BPE on sentences of the test words and save it as a HF tokenizer with
    ``eos = <|endoftext|>``, no pad token, and (by default) a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = TEST_WORDS
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] + ["user", "assistant", "system", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token=None,
                                        additional_special_tokens=specials[1:])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> str:
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe_chatml"))
