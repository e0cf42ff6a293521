"""SubspaceTrainer: random subspaces and TWA on tiny models, through the real transformers Trainer."""
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import hf_subspace as hs
from hf_subspace.trainer import SubspaceTrainer, SubspaceTrainingArguments
from hf_subspace.twa import TWATrainer, TWATrainingArguments, twa_from_checkpoints

from conftest import tiny_bert_cls, tiny_resnet


def text_dataset(n=64, seed=0):
    """Label = whether token 7 appears: learnable by a tiny BERT in a few steps."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 99, size=(n, 10))
    labels = rng.integers(0, 2, size=n)
    ids[labels == 1, rng.integers(0, 10)] = 7
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return ds.with_format("torch")


def image_dataset(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 1, 16, 16)).astype("float32")
    x[:, 0, :4, :4] += labels[:, None, None] * 1.5  # a class signal in one corner
    ds = Dataset.from_dict({"pixel_values": x.tolist(), "labels": labels.tolist()})
    return ds.with_format("torch")


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


#: the Trainer settings every test here starts from (keyword arguments override them)
BASE_SETTINGS = dict(per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=5e-2,
                     num_train_epochs=1, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     disable_tqdm=True, seed=0, dataloader_num_workers=0)


def args(out, **kw):
    return SubspaceTrainingArguments(**{**BASE_SETTINGS, "output_dir": out, **kw})


def twa_args(out, **kw):
    """The settings of args(), as TWATrainingArguments (one-run TWA)."""
    return TWATrainingArguments(**{**BASE_SETTINGS, "output_dir": out, **kw})


def test_random_subspace_trainer_end_to_end(tmp_out):
    a = args(tmp_out, subspace_dim=200, subspace_projection="fastfood", subspace_mode="said",
             gradient_accumulation_steps=2, eval_strategy="epoch", save_strategy="steps", save_steps=2,
             weight_decay=0.1)
    model = tiny_bert_cls()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SubspaceTrainer(model=model, args=a, train_dataset=text_dataset(), eval_dataset=text_dataset(32, 1),
                              compute_metrics=accuracy)
    c0 = trainer.model.base_model.subspace.coeffs["default"].detach().clone()
    trainer.train()
    logs = trainer.state.log_history
    info = next(l for l in logs if "subspace_d" in l)
    assert info["subspace_d"] == 200 and info["trainable_params"] == 200 + 32 * 2 + 2
    assert info["subspace_D"] == sum(v.numel() for n, v in before.items() if not n.startswith("classifier"))
    assert any("eval_accuracy" in l for l in logs)
    c1 = trainer.model.base_model.subspace.coeffs["default"]
    assert not torch.equal(c0, c1)
    # weight decay was not applied to c: its optimizer group has weight_decay 0
    group = next(g for g in trainer.optimizer.param_groups if any(p is c1 for p in g["params"]))
    assert group["weight_decay"] == 0.0
    # checkpoints hold the adapter, not the model
    ckpt = os.path.join(tmp_out, "checkpoint-2")
    assert os.path.exists(os.path.join(ckpt, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))
    assert "base_model.subspace.coeffs" in load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    # base weights untouched
    merged_free = trainer.model.get_base_model()
    w = merged_free.bert.encoder.layer[0].attention.self.query.parametrizations.weight.original
    assert torch.equal(w, before["bert.encoder.layer.0.attention.self.query.weight"])


def test_resume_gives_the_same_coefficients(tmp_path):
    def run(out, max_steps, resume=None, save=False):
        torch.manual_seed(0)
        a = args(str(out), subspace_dim=100, max_steps=max_steps, save_strategy="steps" if save else "no",
                 save_steps=3, learning_rate=1e-2)
        t = SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset())
        t.train(resume_from_checkpoint=resume)
        return t.model.base_model.subspace.coeffs["default"].detach().clone()

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 6, save=True)  # leaves checkpoint-3
    resumed = run(tmp_path / "c", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert torch.equal(resumed, straight)  # bit-identical on CPU


def test_bf16_and_activation_checkpointing(tmp_out):
    a = args(tmp_out, subspace_dim=100, bf16=True, gradient_checkpointing=True,
             gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=3)
    trainer = SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset())
    trainer.train()
    c = trainer.model.base_model.subspace.coeffs["default"]
    assert c.dtype == torch.float32 and torch.isfinite(c).all() and c.abs().sum() > 0


def test_accepts_an_already_wrapped_model(tmp_out):
    from peft import get_peft_model

    wrapped = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=64, task_type="SEQ_CLS"))
    trainer = SubspaceTrainer(model=wrapped, args=args(tmp_out, max_steps=2), train_dataset=text_dataset())
    assert trainer.model is wrapped
    trainer.train()


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        args("x", subspace_dim=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        args("x", subspace_dim=10, twa=True)
    with pytest.raises(ValueError, match="twa_basis"):
        twa_args("x", twa_basis="svd")
    with pytest.raises(ValueError, match="twa_lr_schedule"):
        twa_args("x", twa_lr_schedule="exp")
    with pytest.raises(ValueError, match="twa_optimizer"):
        twa_args("x", twa_optimizer="lbfgs")


@pytest.mark.parametrize("schedule, expected", [
    ("step", [1.0, 1.0, 0.1, 0.01]),            # ÷10 at 50% and 75% of 8 steps: steps 4 and 6
    ("linear", [1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1.0, 0.8536, 0.5, 0.1464]),
    ("constant", [1.0, 1.0, 1.0, 1.0]),
])
def test_twa_learning_rate_schedules(schedule, expected):
    from hf_subspace.twa.trainer import _twa_scheduler

    c = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([c], lr=1.0)
    sched = _twa_scheduler(opt, twa_args("x", twa_lr_schedule=schedule), total=8)
    seen = []
    for step in range(8):
        if step % 2 == 0:
            seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, abs=1e-4)


def _span_residual(result, model):
    params = dict(model.named_parameters())
    flat = torch.cat([(params[n].detach().double() - result.mean[n].double()).reshape(-1) for n in result.names])
    Q = result.basis.double()
    return (flat - Q.T @ (Q @ flat)).norm() / flat.norm().clamp_min(1e-30), flat.norm()


def test_twa_one_run_stays_in_the_span_and_recalibrates_bn(tmp_out):
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    a = twa_args(tmp_out, num_train_epochs=4, learning_rate=0.05, twa_epochs=1, twa_learning_rate=0.5,
             eval_strategy="no", twa_snapshot_steps=2)
    model = tiny_resnet()
    trainer = TWATrainer(model=model, args=a, train_dataset=image_dataset(), eval_dataset=image_dataset(32, 1),
                         compute_metrics=accuracy, callbacks=[CountSteps()])
    trainer.train()
    assert CountSteps.steps == 4 * 8 + 8  # user callbacks see the TWA phase too
    result = trainer.twa_result
    assert len(trainer.snapshot_callback.store) == 16  # 4 epochs x 8 steps / every 2 steps
    assert result.k >= 2 and result.orthonormality_error <= 1e-6
    assert result.coefficients.abs().sum() > 0
    residual, moved = _span_residual(result, trainer.model)
    assert moved > 0 and residual < 1e-4
    assert not any(hasattr(m, "parametrizations") for m in trainer.model.modules())  # merged, plain model
    assert "twa_eval_accuracy" in result.metrics
    assert all(p.requires_grad for p in trainer.model.parameters())
    trainer.create_model_card()
    card = open(os.path.join(tmp_out, "README.md")).read()
    assert "- twa" in card.split("---")[1] and f"{result.num_snapshots} weight snapshots" in card
    assert "twa_eval_accuracy" in card


def test_twa_phase_batch_size(tmp_out):
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, **kwargs):
            Steps.seen.append(args.per_device_train_batch_size)

    a = twa_args(tmp_out, num_train_epochs=2, twa_snapshot_steps=4, twa_batch_size=4, twa_learning_rate=0.3)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset(), callbacks=[Steps()])
    trainer.train()
    assert Steps.seen == [8] * 16 + [4] * 16  # 64 images: 8 steps of 8 per ordinary epoch, 16 of 4 in the TWA one


def test_twa_phase_with_adamw_stays_in_the_span(tmp_out):
    from hf_subspace.twa.trainer import _twa_optimizer

    c = torch.nn.Parameter(torch.zeros(3))
    opt = _twa_optimizer([c], twa_args("x", twa_optimizer="adamw", twa_learning_rate=0.03, twa_weight_decay=0.0))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.03
    opt = _twa_optimizer([c], twa_args("x", twa_momentum=0.5))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5

    a = twa_args(tmp_out, num_train_epochs=2, learning_rate=0.05, twa_snapshot_steps=2,
             twa_optimizer="adamw", twa_learning_rate=0.05)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    trainer.train()
    result = trainer.twa_result
    assert result.coefficients.abs().min() > 0  # Adam moves every coefficient from the first step
    residual, moved = _span_residual(result, trainer.model)
    assert moved > 0 and residual < 1e-4


def test_twa_result_saves_as_an_adapter_that_holds_the_basis(tmp_out, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    a = twa_args(tmp_out, num_train_epochs=3, learning_rate=0.05, twa_learning_rate=0.5, twa_snapshot_steps=2)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    trainer.train()
    result = trainer.twa_result
    paths = hs.save_twa_adapter(trainer.model, result, tmp_path / "twa")
    with safe_open(os.path.join(paths["adapter"], "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        basis = f.get_tensor(next(k for k in keys if "projection_basis" in k))
    assert basis.shape == (result.k, result.projection.D)
    from transformers import ResNetForImageClassification

    base = ResNetForImageClassification.from_pretrained(paths["base"]).eval()
    loaded = PeftModel.from_pretrained(base, paths["adapter"]).eval()
    x = image_dataset(8, 1)[:]["pixel_values"]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, trainer.model(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)
    # without the basis in the file the adapter cannot be rebuilt: a clear error, not a zero subspace
    with pytest.raises(ValueError, match="save_projection=True"):
        hs.SubspaceConfig(dim=4, projection="trajectory")


def test_twa_starts_exactly_at_the_snapshot_mean(tmp_out):
    # with a zero learning rate the coefficients stay 0: the result must be the mean of the snapshots
    a = twa_args(tmp_out, num_train_epochs=3, learning_rate=0.05, twa_learning_rate=0.0, twa_momentum=0.0)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    bn = trainer.model.resnet.embedder.embedder.normalization
    trainer.train()
    store = trainer.snapshot_callback.store
    assert len(store) == 3
    params = dict(trainer.model.named_parameters())
    for name in trainer.twa_result.names:
        mean = sum(store[i][name] for i in range(len(store))) / len(store)
        torch.testing.assert_close(params[name].detach(), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(trainer.twa_result.coefficients, torch.zeros_like(trainer.twa_result.coefficients))
    # BN statistics were recalibrated for the averaged weights (cumulative mean over the data, not the EMA)
    assert bn.running_mean.abs().sum() > 0


def test_bn_statistics_change_on_recalibration():
    from hf_subspace.twa import recalibrate_batchnorm

    model = tiny_resnet()
    bn = model.resnet.embedder.embedder.normalization
    before = bn.running_var.clone()
    loader = torch.utils.data.DataLoader(image_dataset(16), batch_size=8)
    assert recalibrate_batchnorm(model, loader) > 0
    assert not torch.equal(before, bn.running_var)
    assert not model.training


def test_twa_from_trainer_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    a = args(run_dir, num_train_epochs=3, save_strategy="epoch", learning_rate=0.05)
    trainer = SubspaceTrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    trainer.train()
    assert len([d for d in os.listdir(run_dir) if d.startswith("checkpoint-")]) == 3
    from transformers import ResNetForImageClassification

    model = ResNetForImageClassification.from_pretrained(os.path.join(run_dir, "checkpoint-24"))
    post = twa_args(str(tmp_path / "twa"), twa_learning_rate=0.3, twa_epochs=1)
    t2, result = twa_from_checkpoints(run_dir, model, post, train_dataset=image_dataset(),
                                      eval_dataset=image_dataset(32, 1), compute_metrics=accuracy)
    assert result.num_snapshots == 3 and result.k == 2
    residual, _ = _span_residual(result, t2.model)
    assert residual < 1e-4
    t2.save_model(str(tmp_path / "final"))
    reloaded = ResNetForImageClassification.from_pretrained(str(tmp_path / "final"))
    for (n, p), (_, q) in zip(t2.model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(p, q)


def test_twa_needs_two_snapshots(tmp_out):
    a = twa_args(tmp_out, num_train_epochs=1)
    trainer = TWATrainer(model=tiny_resnet(), args=a, train_dataset=image_dataset())
    with pytest.raises(ValueError, match=r"would record only 1 weight snapshot\(s\) \(one per epoch \(epochs of 8 steps; "):
        trainer.train()  # when training starts, not after the ordinary phase
    assert trainer.state.global_step == 0


def test_twa_refuses_checkpoints_of_another_model(tmp_path):
    run_dir = str(tmp_path / "run")
    trainer = SubspaceTrainer(model=tiny_resnet(), args=args(run_dir, num_train_epochs=2, save_strategy="epoch"),
                              train_dataset=image_dataset())
    trainer.train()
    from transformers import ResNetConfig, ResNetForImageClassification

    other = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 24],
                                                      depths=[1, 1], layer_type="basic", num_labels=3))
    with pytest.raises(ValueError, match="shape"):
        twa_from_checkpoints(run_dir, other, args(str(tmp_path / "t")), train_dataset=image_dataset())


def test_cli_twa_from_checkpoints(tmp_path):
    import json
    import subprocess
    import sys

    run_dir = str(tmp_path / "run")
    trainer = SubspaceTrainer(model=tiny_resnet(), args=args(run_dir, num_train_epochs=3, save_strategy="epoch"),
                              train_dataset=image_dataset())
    trainer.train()
    image_dataset().save_to_disk(str(tmp_path / "data"))
    out = str(tmp_path / "twa")
    proc = subprocess.run([sys.executable, "-m", "hf_subspace.cli", "twa", run_dir, "--dataset",
                           str(tmp_path / "data"), "-o", out, "--lr", "0.03", "--batch_size", "8", "--cpu",
                           "--schedule", "linear", "--optimizer", "adamw", "--adapter"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(os.path.join(out, "twa_summary.json")))
    assert summary["snapshots"] == 3 and summary["k"] == 2 and summary["orthonormality_error"] < 1e-6
    assert summary["settings"]["optimizer"] == "adamw" and summary["settings"]["schedule"] == "linear"
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    for part in ("base/model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert os.path.exists(os.path.join(out, "twa_adapter", part))
    bad = subprocess.run([sys.executable, "-m", "hf_subspace.cli", "twa", str(tmp_path), "--dataset", "x", "-o", out],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no checkpoint-* folders" in bad.stderr


def test_cli_info(tmp_path):
    import json
    import subprocess
    import sys

    from peft import get_peft_model

    model = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=77, task_type="SEQ_CLS"))
    model.save_pretrained(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "hf_subspace.cli", "info", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["dim"] == 77 and info["tensors"]["base_model.subspace.coeffs"] == [77]


def test_plain_trainer_refuses_subspace_arguments_with_an_unwrapped_model(tmp_out):
    """transformers.Trainer does not read subspace_dim: given an unwrapped model it would fine-tune every weight."""
    from peft import get_peft_model
    from transformers import Trainer

    with pytest.raises(hs.SubspaceConfigError, match="Trainer was given SubspaceTrainingArguments.*SubspaceTrainer"):
        Trainer(model=tiny_bert_cls(), args=args(tmp_out, subspace_dim=50), train_dataset=text_dataset())
    for a in (args(tmp_out, twa=True), twa_args(tmp_out)):  # TWA arguments: it runs no TWA either
        with pytest.raises(hs.SubspaceConfigError, match="Trainer does not run TWA.*hf_subspace.TWATrainer"):
            Trainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset())
    # a model the user wrapped is trained in its subspace by the plain Trainer: accepted
    wrapped = get_peft_model(tiny_bert_cls(), hs.SubspaceConfig(dim=50))
    Trainer(model=wrapped, args=args(tmp_out, subspace_dim=50), train_dataset=text_dataset())
    # and plain TrainingArguments-like use (no subspace setting) is untouched
    Trainer(model=tiny_bert_cls(), args=args(tmp_out), train_dataset=text_dataset())


def test_a_full_fine_tuning_learning_rate_is_flagged(tmp_out, recwarn):
    """lr 2e-5 on c (a full fine-tuning habit): after subspace_lr_check_steps the trainer warns that θ barely moved,
    naming the range to use; a subspace learning rate gets no such warning."""
    def train(lr):
        a = args(tmp_out, subspace_dim=50, learning_rate=lr, max_steps=3, subspace_lr_check_steps=3)
        SubspaceTrainer(model=tiny_bert_cls(), args=a, train_dataset=text_dataset()).train()
        return [str(w.message) for w in recwarn.list if "far too small for a subspace" in str(w.message)]

    flagged = train(2e-5)
    assert len(flagged) == 1 and "use 1e-3 to 1e-1" in flagged[0] and "2e-05" in flagged[0]
    recwarn.clear()
    assert train(5e-2) == []
    with pytest.raises(hs.SubspaceConfigError, match="subspace_lr_check_steps"):
        args(tmp_out, subspace_dim=50, subspace_lr_check_steps=-1)
