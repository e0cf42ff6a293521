"""TRL's trainers (SFT, DPO, GRPO) with subspace adapters, on a tiny Llama and a byte-level tokenizer.

Each trainer runs a few real steps. What is checked: c (and λ) move and nothing else of the base does; the losses
are finite; and, given an already-trained ``PeftModel`` and no ``ref_model``, the reference TRL builds (its
``"ref"`` adapter, a copy of the parameters whose names contain ``".default."``) is the trained adapter, not the
base model.
"""
import math

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model

import hf_subspace as hs

trl = pytest.importorskip("trl", reason="TRL is in the dev and examples extras (pip install -e '.[dev]')")


def tiny_llama(seed=0):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


PROBE = torch.tensor([[5, 60, 70, 80, 90, 100]])


def _base_logits(model):
    """The logits of the base (the adapter disabled when there is one) on a fixed input: θ0 must not change."""
    with torch.no_grad():
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                return model(input_ids=PROBE).logits
        return model(input_ids=PROBE).logits


def _common(tmp_path, **kw):
    """float32 throughout (GRPO turns bf16 autocast on by default, which would blur the exact checks)."""
    return dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                bf16=False, **kw)


def _finite_losses(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return losses


PREFERENCES = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
               for a in range(4) for b in range(2)]


def test_sft_with_subspace_config_trains_only_c(tmp_path):
    base, tokenizer = tiny_llama()
    before = _base_logits(base)
    texts = [{"text": "In the beginning God created the heaven and the earth."}] * 8
    args = trl.SFTConfig(**_common(tmp_path, max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2,
                                   max_length=64))
    trainer = trl.SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(texts), processing_class=tokenizer,
                             peft_config=hs.SubspaceConfig(dim=96, projection="fastfood", mode="said"))
    assert isinstance(trainer.model, PeftModel)
    engine = hs.find_engine(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.subspace.vectors.default.coeffs", "base_model.subspace.vectors.default.scales"}
    trainer.train()
    losses = _finite_losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses  # the same sentence, six times: it is learnt
    assert engine.coeffs["default"].abs().max() > 0
    assert torch.equal(_base_logits(trainer.model), before)  # θ0 untouched


def _trained_peft_model(mode="said"):
    """A PeftModel whose adapter is already trained (c and λ away from 0 and 1), as a user would load one."""
    base, tokenizer = tiny_llama()
    model = get_peft_model(base, hs.SubspaceConfig(dim=80, projection="hashing", mode=mode, seed=3))
    engine = hs.find_engine(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        engine.coeffs["default"].copy_(3.0 * torch.randn(engine.coeffs["default"].shape, generator=g))
        if mode == "said":
            engine.scales["default"].copy_(1 + torch.rand(engine.scales["default"].shape, generator=g))
    return model, tokenizer, engine


def test_dpo_with_trained_peft_model_uses_it_as_reference(tmp_path):
    """No ref_model: TRL copies the trained adapter into a frozen "ref" adapter. At step 0 the policy is the
    reference, so each log-ratio is 0: rewards 0 and loss exactly log 2 (with the base as reference, they are not)."""
    model, tokenizer, engine = _trained_peft_model()
    trained_c, trained_l = engine.coeffs["default"].detach().clone(), engine.scales["default"].detach().clone()
    with torch.no_grad():  # the base (adapter off) differs from the trained model on this data: the check can fail
        ids = tokenizer("1+1=2", return_tensors="pt").input_ids
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        assert not torch.allclose(off, model(input_ids=ids).logits, atol=1e-3)
    args = trl.DPOConfig(**_common(tmp_path, disable_dropout=True, max_steps=3, per_device_train_batch_size=8,
                                   learning_rate=5e-2))
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PREFERENCES),
                             processing_class=tokenizer)
    assert set(model.peft_config) == {"default", "ref"}
    assert torch.equal(engine.coeffs["ref"], trained_c) and torch.equal(engine.scales["ref"], trained_l)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), first
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0,
                                                                                                          abs=1e-6)
    _finite_losses(trainer)
    assert not torch.equal(engine.coeffs["default"], trained_c)  # the policy trained ...
    assert torch.equal(engine.coeffs["ref"], trained_c) and torch.equal(engine.scales["ref"], trained_l)  # ref frozen
    assert engine.active == ["default"]


def test_dpo_with_subspace_config_learns_the_preferences(tmp_path):
    """peft_config: the reference is the base (c = 0, what the adapter starts from); training raises the margin."""
    base, tokenizer = tiny_llama()
    args = trl.DPOConfig(**_common(tmp_path, disable_dropout=True, max_steps=8, per_device_train_batch_size=8,
                                   learning_rate=0.5, lr_scheduler_type="constant"))
    trainer = trl.DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(PREFERENCES),
                             processing_class=tokenizer,
                             peft_config=hs.SubspaceConfig(dim=64, projection="sparse", seed=1))
    engine = hs.find_engine(trainer.model)
    assert list(trainer.model.peft_config) == ["default"]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # c = 0: the policy is the base
    _finite_losses(trainer)
    assert logs[-1]["rewards/margins"] > 0.05 and logs[-1]["loss"] < math.log(2) - 0.02, logs[-1]
    assert engine.coeffs["default"].abs().max() > 0


def _reward_length(completions, **kwargs):
    """The decoded length: bytes the tokenizer cannot decode on their own (>= 128) are dropped, so a random model's
    completions of 8 tokens score between 0 and 8, differently within each group."""
    return [float(len(c)) for c in completions]


def _grpo_args(tmp_path, **kw):
    return trl.GRPOConfig(**_common(tmp_path, disable_dropout=True, per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=8, learning_rate=5e-2, temperature=1.0, **kw))


def test_grpo_with_subspace_config_trains_c(tmp_path):
    base, tokenizer = tiny_llama()
    prompts = Dataset.from_list([{"prompt": p} for p in ("abc", "hello", "xyz", "aaa")])
    trainer = trl.GRPOTrainer(model=base, reward_funcs=_reward_length, args=_grpo_args(tmp_path, max_steps=3),
                              train_dataset=prompts, processing_class=tokenizer,
                              peft_config=hs.SubspaceConfig(dim=64, projection="hashing"))
    engine = hs.find_engine(trainer.model)
    before = _base_logits(trainer.model)
    trainer.train()
    _finite_losses(trainer)
    assert engine.coeffs["default"].abs().max() > 0
    assert torch.equal(_base_logits(trainer.model), before)


def test_grpo_with_trained_peft_model_and_beta_uses_it_as_reference(tmp_path):
    """beta > 0 and no ref_model: the KL term is taken against the trained adapter (0 at the first step)."""
    model, tokenizer, engine = _trained_peft_model(mode="global")
    trained_c = engine.coeffs["default"].detach().clone()
    prompts = Dataset.from_list([{"prompt": p} for p in ("abc", "hello", "xyz", "aaa")])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward_length,
                              args=_grpo_args(tmp_path, max_steps=2, beta=0.1), train_dataset=prompts,
                              processing_class=tokenizer)
    assert torch.equal(engine.coeffs["ref"], trained_c)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert logs and logs[0]["kl"] == pytest.approx(0, abs=1e-6), logs
    assert torch.equal(engine.coeffs["ref"], trained_c)


# -- the examples (examples/trl), with --tiny: the real scripts, in one subprocess (one import of TRL) -------------
EXAMPLE_MEASURES = {"sft": ["eval_loss_before", "eval_loss_after"],
                    "dpo": ["preference_accuracy_before", "preference_accuracy_after", "dpo_eval_rewards_margin"],
                    "grpo": ["mean_reward_before", "mean_reward_after", "reward_of_the_verses"]}


def test_trl_examples_run_and_save_their_adapters(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    smoke = ["--tiny", "--max_steps", "3", "--subspace_dim", "100", "--max_train_samples", "24", "--eval_samples", "8"]
    code = "; ".join(["import sys", f"sys.path.insert(0, {os.path.join(root, 'examples', 'trl')!r})"] + [
        f"import {name}; {name}.main({smoke + ['--output_dir', str(tmp_path / name)]!r})" for name in EXAMPLE_MEASURES])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("adapter saved to") == len(EXAMPLE_MEASURES)
    for name, measured in EXAMPLE_MEASURES.items():
        result = json.loads((tmp_path / name / "results.json").read_text())
        assert result["steps"] == 3 and result["subspace_d"] == 100, (name, result)
        assert all(math.isfinite(result[k]) for k in measured), (name, result)
        config = json.loads((tmp_path / name / "final" / "adapter_config.json").read_text())
        assert config["peft_type"] == "SUBSPACE" and config["dim"] == 100, name


def test_kto_and_rloo_with_trained_peft_model_copy_it_into_their_reference(tmp_path):
    """KTO and RLOO build their reference the same way (a "ref" adapter, ".default." parameters copied); one step
    each, then the reference still holds the trained c and λ while the policy moved."""
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in PREFERENCES
                for k in ("chosen", "rejected")]
    prompts = Dataset.from_list([{"prompt": p} for p in ("abc", "hello", "xyz", "aaa")])
    builders = {
        "kto": lambda model, tok: trl.KTOTrainer(
            model=model, args=trl.KTOConfig(**_common(tmp_path / "kto", max_steps=1, per_device_train_batch_size=8,
                                                      learning_rate=5e-2)),
            train_dataset=Dataset.from_list(unpaired), processing_class=tok),
        "rloo": lambda model, tok: trl.RLOOTrainer(
            model=model, reward_funcs=_reward_length, train_dataset=prompts, processing_class=tok,
            args=trl.RLOOConfig(**_common(tmp_path / "rloo", max_steps=1, per_device_train_batch_size=4,
                                          num_generations=4, max_completion_length=8, learning_rate=5e-2,
                                          beta=0.1))),
    }
    for name, build in builders.items():
        model, tokenizer, engine = _trained_peft_model()
        trained_c, trained_l = engine.coeffs["default"].detach().clone(), engine.scales["default"].detach().clone()
        trainer = build(model, tokenizer)
        assert set(model.peft_config) == {"default", "ref"}, name
        assert torch.equal(engine.coeffs["ref"], trained_c) and torch.equal(engine.scales["ref"], trained_l), name
        trainer.train()
        _finite_losses(trainer)
        assert torch.equal(engine.coeffs["ref"], trained_c) and torch.equal(engine.scales["ref"], trained_l), name
        assert not torch.equal(engine.coeffs["default"], trained_c), name
