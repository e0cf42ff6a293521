"""What tests/test_distributed.py runs under ``torchrun --nproc_per_node 2`` (gloo, CPU), and its 1-process twin.

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT`` runs every scenario on both
ranks and writes ``OUT/rank<r>.json`` (and, from rank 0, ``OUT/*.pt``): a failing scenario records its error
instead of stopping the others. The test process runs the same training functions on one process and compares.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8
STEPS = 4
DIM = 50


def tiny_bert(seed=0):
    """The tests' tiny BERT without dropout (ranks draw other dropout masks than one process would)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def text_dataset(n=GLOBAL_BATCH * STEPS, seed=0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 99, size=(n, 10))
    labels = rng.integers(0, 2, size=n)
    ids[labels == 1, rng.integers(0, 10)] = 7
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def trainer_args(out, world_size, **kw):
    from hf_subspace import SubspaceTrainingArguments

    return SubspaceTrainingArguments(**_base_args(out, world_size, **kw))


def twa_trainer_args(out, world_size, **kw):
    from hf_subspace import TWATrainingArguments

    return TWATrainingArguments(**_base_args(out, world_size, **kw))


def _base_args(out, world_size, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world_size, learning_rate=1e-2,
                max_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential",
                # transformers multiplies the loss by the number of processes when the model's forward takes
                # **kwargs, assuming it divides by the global num_items_in_batch; BERT's classification loss is a
                # plain mean, so its DDP gradients would be N times one process's (grad clipping then differs)
                average_tokens_across_devices=False)
    base.update(kw)
    return base


def train(out, world_size, counter=None, **kw):
    """Train the tiny BERT with ``SubspaceTrainer`` (a subspace when ``subspace_dim`` is given, else in full);
    returns the trainer. ``counter`` (a CommCounter) is attached to DDP when training starts."""
    from hf_subspace import SubspaceTrainer
    from benchmarks._comm import CommCountCallback

    trainer = SubspaceTrainer(model=tiny_bert(), args=trainer_args(out, world_size, **kw),
                              train_dataset=text_dataset())
    if counter is not None:
        trainer.add_callback(CommCountCallback(trainer, counter))
    trainer.train()
    return trainer


def subspace_state(trainer) -> dict:
    """c and the head after training (CPU tensors)."""
    model = trainer.model
    engine = model.base_model.subspace
    head = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad and "coeffs" not in n}
    return {"c": engine.coeffs["default"].detach().cpu().clone(), "head": head}


def trainable_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------
# scenarios (every rank runs each; each returns what rank r records)
# ------------------------------------------------------------------------------------------------------------
def scenario_subspace(out, rank, world):
    from benchmarks._comm import CommCounter

    counter = CommCounter()
    with counter.counting():
        trainer = train(os.path.join(out, "subspace"), world, counter, subspace_dim=DIM)
    if rank == 0:
        torch.save(subspace_state(trainer), os.path.join(out, "subspace.pt"))
    return {"counter": counter.summary(), "syncs": counter.syncs, "trainable": trainable_numel(trainer.model),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def train_twa(out, world_size, **kw):
    """One-run TWA on the tiny BERT: 4 ordinary steps with a snapshot after each, then one epoch (4 steps) on the
    coefficients; returns the trainer (``trainer.model`` merged, ``trainer.twa_result.coefficients``)."""
    from hf_subspace import TWATrainer

    # SGD in the ordinary phase too: Adam turns rounding-level differences of near-zero gradients into ±lr steps
    args = twa_trainer_args(out, world_size, twa_snapshot_steps=1, twa_learning_rate=0.5, learning_rate=0.5,
                            optim="sgd", **kw)
    trainer = TWATrainer(model=tiny_bert(), args=args, train_dataset=text_dataset())
    trainer.train()
    return trainer


def twa_state(trainer) -> dict:
    return {"coefficients": trainer.twa_result.coefficients.clone(), "k": trainer.twa_result.k,
            "weights": {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}}


def scenario_twa(out, rank, world, shard=True):
    from benchmarks._comm import CommCounter

    counter = CommCounter()
    with counter.counting():  # attaches to both DDPs: the ordinary phase's and the TWA phase's inner Trainer's
        trainer = train_twa(os.path.join(out, f"twa-{shard}"), world, twa_shard_basis=shard)
    if rank == 0:
        torch.save(twa_state(trainer), os.path.join(out, f"twa-{'sharded' if shard else 'whole'}.pt"))
    result = trainer.twa_result
    return {"syncs": counter.syncs, "k": result.k, "D": sum(p.numel() for p in trainer.model.parameters()),
            "basis_bytes_per_rank": getattr(result, "basis_bytes_per_rank", None),
            "basis_rank0": None if rank else list(result.basis.shape),
            "outside": {k: v for k, v in counter.outside.items() if k in ("all_gather_single", "reduce_scatter_single",
                                                                           "gather")}}


def scenario_twa_whole(out, rank, world):
    return scenario_twa(out, rank, world, shard=False)


def train_posthoc(out, world_size):
    """Post-hoc TWA: an ordinary SGD run that saves a checkpoint every step, then ``twa_from_checkpoints`` over
    them; returns ``twa_state``."""
    from hf_subspace import SubspaceTrainer, twa_from_checkpoints

    run_dir = os.path.join(out, "run")
    first = trainer_args(run_dir, world_size, optim="sgd", learning_rate=0.5, save_strategy="steps", save_steps=1)
    SubspaceTrainer(model=tiny_bert(), args=first, train_dataset=text_dataset()).train()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every checkpoint written (rank 0 writes them) before any rank reads them
    args = twa_trainer_args(os.path.join(out, "twa"), world_size, twa_learning_rate=0.5)
    trainer, result = twa_from_checkpoints(run_dir, tiny_bert(), args, train_dataset=text_dataset())
    trainer.twa_result = result
    return trainer


def scenario_posthoc(out, rank, world):
    trainer = train_posthoc(os.path.join(out, "posthoc"), world)
    if rank == 0:
        torch.save(twa_state(trainer), os.path.join(out, "posthoc.pt"))
    return {"k": trainer.twa_result.k, "basis_bytes_per_rank": getattr(trainer.twa_result, "basis_bytes_per_rank",
                                                                         None)}


def accelerate_loop(world_size, counter=None):
    """A training loop of one's own with accelerate (as accelerate's nlp_example): prepare, check the projections,
    AdamW on c and the head; returns ``(c, losses)``."""
    from accelerate import Accelerator
    from peft import get_peft_model
    from torch.utils.data import DataLoader

    import hf_subspace as hs

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_bert(), hs.SubspaceConfig(dim=DIM, task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loader = DataLoader(text_dataset(), batch_size=GLOBAL_BATCH // world_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hs.check_projections_match(model)
    if counter is not None and world_size > 1:
        counter.attach(model)
    model.train()
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))
    engine = hs.find_engine(accelerator.unwrap_model(model))
    return engine.coeffs["default"].detach().cpu().clone(), losses


def scenario_accelerate(out, rank, world):
    from benchmarks._comm import CommCounter

    counter = CommCounter()
    c, losses = accelerate_loop(world, counter)
    if rank == 0:
        torch.save(c, os.path.join(out, "accelerate_c.pt"))
    return {"syncs": counter.syncs, "losses": losses}


def image_dataset(n=GLOBAL_BATCH * STEPS, seed=0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 1, 16, 16)).astype("float32")
    x[:, 0, :4, :4] += labels[:, None, None] * 1.5
    return Dataset.from_dict({"pixel_values": x.tolist(), "labels": labels.tolist()}).with_format("torch")


def scenario_twa_batchnorm(out, rank, world):
    """One-run TWA of a CNN with BatchNorm: every rank recalibrates on its share of the data, then the statistics
    are averaged, so all ranks end with the same model. Returns a digest of the final buffers and weights."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_subspace import TWATrainer

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                      depths=[1, 1], layer_type="basic", num_labels=3))
    args = twa_trainer_args(os.path.join(out, "twa-bn"), world, twa_snapshot_steps=1, optim="sgd",
                            learning_rate=0.1, twa_learning_rate=0.1)
    trainer = TWATrainer(model=model, args=args, train_dataset=image_dataset())
    trainer.train()
    bufs = {n: b.detach().double() for n, b in trainer.model.named_buffers() if "running" in n}
    return {"buffers": {n: [float(b.sum()), float(b.abs().max())] for n, b in bufs.items()},
            "weights": float(sum(p.detach().double().abs().sum() for p in trainer.model.parameters()))}


def scenario_full(out, rank, world):
    from benchmarks._comm import CommCounter

    counter = CommCounter()
    trainer = train(os.path.join(out, "full"), world, counter, max_steps=2)
    return {"counter": counter.summary(), "syncs": counter.syncs, "trainable": trainable_numel(trainer.model)}


def _expect_mismatch(make):
    """Build a model with ``make()`` on this rank and run the check: the error message, or None if it passed."""
    import hf_subspace as hs

    model = make()
    try:
        hs.check_projections_match(model)
    except hs.ProjectionMismatchError as e:
        return str(e)
    return None


def scenario_mismatch(out, rank, world):
    from peft import get_peft_model

    import hf_subspace as hs

    def wrapped(**kw):
        kw = {"dim": DIM, **kw}
        return lambda: get_peft_model(tiny_bert(), hs.SubspaceConfig(task_type="SEQ_CLS", **kw))

    def other_entries():  # the same (kind, D, d, seed, format) but another P: as another library version would draw
        model = wrapped()()
        if rank == 1:
            proj = hs.find_engine(model).adapters["default"].projection
            proj.v.neg_()
        return model

    return {
        "same": _expect_mismatch(wrapped(seed=0)),
        "seed": _expect_mismatch(wrapped(seed=rank)),
        "dim": _expect_mismatch(wrapped(dim=DIM + rank)),
        "theta": _expect_mismatch(wrapped(target_modules=["query"] if rank else ["query", "value"])),
        "entries": _expect_mismatch(other_entries),
    }


def scenario_trainer_seed(out, rank, world):
    """The SubspaceTrainer stops at the start of training when the ranks' seeds differ."""
    try:
        train(os.path.join(out, "seed"), world, subspace_dim=DIM, subspace_seed=rank)
    except Exception as e:  # noqa: BLE001
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


# ------------------------------------------------------------------------------------------------------------
# FSDP2: θ0 sharded, c replicated
# ------------------------------------------------------------------------------------------------------------
FSDP_DIM = 80
#: (projection, mode, reshard_after_forward, tied embedding and head, non-reentrant activation checkpointing,
#: micro-batches accumulated per step)
FSDP_CASES = [("hashing", "global", True, True, False, 1), ("hashing", "said", True, True, False, 1),
              ("fastfood", "global", True, True, False, 1), ("fastfood", "said", False, True, False, 1),
              ("hashing", "global", True, False, False, 1), ("fastfood", "said", True, True, True, 1),
              ("hashing", "said", True, True, False, 2)]


def fsdp_case_name(kind, mode, reshard, tied, checkpointing, micro):
    return f"{kind}-{mode}" + ("" if reshard else "-kept") + ("" if tied else "-untied") + \
        ("-checkpointed" if checkpointing else "") + (f"-accumulated{micro}" if micro > 1 else "")
FSDP_CLIP = 0.01  # below every step's gradient norm: clipping acts, so averaging after it would give another c
FSDP_IDS = [[3, 9, 27, 17, 51, 1, 40, 33, 8, 60, 12, 5]]  # a fixed prompt for comparing logits


def tiny_llama(seed=0, tied=True):
    """A tiny Llama with tied embeddings (one θ0 read by the embedding and the head), or untied (as Llama-2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


def llama_batches(steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (GLOBAL_BATCH, 12), generator=g) for _ in range(steps)]


def llama_dataset():
    from datasets import Dataset

    ids = torch.cat(llama_batches()).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")


def subspace_llama(kind="hashing", mode="global", seed=0, tied=True):
    from peft import get_peft_model

    import hf_subspace as hs

    return get_peft_model(tiny_llama(tied=tied), hs.SubspaceConfig(dim=FSDP_DIM, projection=kind, mode=mode, seed=seed))


def vectors(model) -> dict:
    import hf_subspace as hs

    engine = hs.find_engine(model)
    out = {"c": engine.coeffs["default"].detach().cpu().clone()}
    if "default" in engine.scales:
        out["scales"] = engine.scales["default"].detach().cpu().clone()
    return out


def fsdp_loop(kind, mode, world_size, rank=0, reshard=True, tied=True, checkpointing=False, micro=1):
    """AdamW on c (and λ) with gradient clipping, STEPS steps of GLOBAL_BATCH sequences; sharded with
    ``hf_subspace.shard_model`` on several processes, plain on one. Returns ``(model, vectors)``."""
    import hf_subspace as hs

    model = subspace_llama(kind, mode, tied=tied)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if world_size > 1:
        hs.shard_model(model, reshard_after_forward=reshard)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for ids in llama_batches():
        for part in ids.chunk(world_size)[rank].chunk(micro):  # accumulated: c's gradient averaged per backward
            (model(input_ids=part, labels=part).loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(params, FSDP_CLIP)
        opt.step()
        opt.zero_grad()
    return model, vectors(model)


def scenario_fsdp_train(out, rank, world):
    from torch.distributed.fsdp import FSDPModule

    import hf_subspace as hs

    got, saved = {}, {}
    for case in FSDP_CASES:
        model, vec = fsdp_loop(case[0], case[1], world, rank, *case[2:])
        engine = hs.find_engine(model)
        theta0 = [engine.original(s.name) for s in engine.adapters["default"].layout.slots]
        name = fsdp_case_name(*case)
        saved[name] = vec
        got[name] = {
            "units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
            "groups": len({id(m._get_fsdp_state()) for m in model.modules() if isinstance(m, FSDPModule)}),
            "vectors": [(type(p).__name__, str(p.dtype)) for p in engine.vectors.parameters()],
            "theta0_local": sum(t.to_local().numel() for t in theta0),
            "theta0_whole": sum(t.numel() for t in theta0),
            "cache": engine.inference_cache,
            "c": vec["c"].tolist()}
    if rank == 0:
        torch.save(saved, os.path.join(out, "fsdp_train.pt"))
    return got


@contextlib.contextmanager
def fsdp_on_cpu():
    """accelerate runs FSDP on accelerators only: on CPU it ignores the FSDP plugin and runs DDP (MULTI_CPU). This
    makes an AcceleratorState built with an FSDP plugin on several CPU processes an FSDP one, as it is on GPUs, so
    accelerate's own FSDP2 preparation (Accelerator.prepare -> fsdp2_prepare_model) runs here over gloo."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    AcceleratorState.__init__ = patched
    try:
        yield
    finally:
        AcceleratorState.__init__ = init
        AcceleratorState._reset_state(True)  # the scenarios after this one get DDP again
        GradientState._reset_state()


def fsdp_accelerate_loop(world_size, rank=0, mixed_precision="no"):
    """A loop of one's own through accelerate's FSDP2 plugin (fsdp_version=2, the transformer wrap policy):
    prepare, check the projections, clip with accelerator.clip_grad_norm_; returns ``(accelerator, model)``."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    import hf_subspace as hs

    with fsdp_on_cpu():
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, fsdp_plugin=plugin)
        assert accelerator.is_fsdp2
        model = subspace_llama("hashing", "said")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                      weight_decay=0.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        hs.check_projections_match(model)
        for ids in llama_batches():
            part = ids.chunk(world_size)[rank]
            accelerator.backward(model(input_ids=part, labels=part).loss)
            accelerator.clip_grad_norm_(model.parameters(), FSDP_CLIP)
            optimizer.step()
            optimizer.zero_grad()
    return accelerator, model


def scenario_fsdp_accelerate(out, rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import hf_subspace as hs
    from hf_subspace.fingerprint import fingerprints_match

    accelerator, model = fsdp_accelerate_loop(world, rank)
    engine = hs.find_engine(model)
    got = {"units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
           "vectors": [(type(p).__name__, str(p.dtype)) for p in engine.vectors.parameters()]}
    adapter = os.path.join(out, "fsdp_adapter")
    if rank == 0:  # rank 0 alone writes c: nothing is gathered
        model.save_pretrained(adapter)
        got["files"] = sorted(os.listdir(adapter))
        got["adapter_bytes"] = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    dist.barrier()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(FSDP_IDS)).logits
    # the plain model's state dict from the shards (θ0 + δ per shard), gathered here only to compare
    plain = hs.plain_state_dict(model)
    keys = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.norm.weight"]
    got["plain_types"] = {k: type(plain["base_model.model." + k]).__name__ for k in keys}
    whole = {k: plain["base_model.model." + k].full_tensor() for k in keys}
    # the fingerprint of θ0 from the shards (one all-reduce of 65 numbers per tensor) fits the one recorded whole
    slots = engine.adapters["default"].layout.slots
    from hf_subspace.fingerprint import fingerprint_tensors

    fp = fingerprint_tensors([engine.original(s.name) for s in slots])
    got["fingerprint_matches"] = fingerprints_match(model.peft_config["default"].base_fingerprint,
                                                    [engine.original(s.name) for s in slots])
    got["fingerprint"] = fp
    from hf_subspace.fsdp import sum_of_squares

    got["theta0_sum_of_squares"] = sum_of_squares([engine.original(s.name) for s in slots])  # all-reduced
    if rank == 0:
        torch.save({"vectors": vectors(model), "logits": logits, "plain": whole}, os.path.join(out, "fsdp_acc.pt"))
    _, bf16 = fsdp_accelerate_loop(world, rank, mixed_precision="bf16")  # c stays a float32 replica under bf16
    got["bf16_vectors"] = [(type(p).__name__, str(p.dtype)) for p in hs.find_engine(bf16).vectors.parameters()]
    got["bf16_c"] = vectors(bf16)["c"].tolist()
    got["bf16_units"] = sorted(type(m).__name__ for m in bf16.modules() if isinstance(m, FSDPModule))
    return got


def llama_trainer_args(out, world_size, **kw):
    from hf_subspace import SubspaceTrainingArguments

    base = dict(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // world_size, learning_rate=1e-2,
                max_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                seed=0, dataloader_num_workers=0, train_sampling_strategy="sequential", max_grad_norm=FSDP_CLIP,
                subspace_dim=FSDP_DIM, subspace_projection="fastfood", subspace_mode="said")
    base.update(kw)
    return SubspaceTrainingArguments(**base)


def train_llama(out, world_size, fsdp=False, resume=None, **kw):
    """SubspaceTrainer on the tiny Llama (fastfood, SAID), with FSDP2 (fsdp + fsdp_config version 2) or not."""
    from hf_subspace import SubspaceTrainer

    if fsdp:
        kw.update(fsdp=True, fsdp_config={"version": 2})
    trainer = SubspaceTrainer(model=tiny_llama(), args=llama_trainer_args(out, world_size, **kw),
                              train_dataset=llama_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def scenario_fsdp_trainer(out, rank, world):
    from torch.distributed.fsdp import FSDPModule

    run = os.path.join(out, "fsdp_trainer")
    with fsdp_on_cpu():  # a checkpoint half-way: the adapter and c's optimizer state, nothing of size D
        trainer = train_llama(run, world, fsdp=True, save_strategy="steps", save_steps=STEPS // 2)
        trainer.save_model(os.path.join(out, "fsdp_trainer_adapter"))
        model = trainer.model
        got = {"units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "c": vectors(model)["c"].tolist(),
               "checkpoint": sorted(os.listdir(os.path.join(run, f"checkpoint-{STEPS // 2}")))}
    with fsdp_on_cpu():
        resumed = train_llama(os.path.join(out, "fsdp_trainer"), world, fsdp=True,
                              resume=os.path.join(run, f"checkpoint-{STEPS // 2}"))
        got["resumed_c"] = vectors(resumed.model)["c"].tolist()
    if rank == 0:
        torch.save(vectors(model), os.path.join(out, "fsdp_trainer.pt"))
    return got


def scenario_fsdp_refusals(out, rank, world):
    """What stays refused under FSDP: c sharded into a group by fully_shard applied by hand (function and
    Trainer), merging into the sharded θ0, TWA; rank-mismatched projections stop with the usual error."""
    from torch.distributed.fsdp import fully_shard

    import hf_subspace as hs
    from hf_subspace.distributed import refuse_sharded_training

    def message(fn):
        try:
            fn()
        except (ValueError, hs.ProjectionMismatchError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    by_hand = subspace_llama()
    fully_shard(by_hand)  # no ignored_params: c lands in the root group
    got = {"function": message(lambda: refuse_sharded_training(by_hand)),
           "trainer": message(lambda: hs.SubspaceTrainer(model=by_hand, args=trainer_args(
               os.path.join(out, "fsdp"), world), train_dataset=llama_dataset()))}
    sharded = hs.shard_model(subspace_llama())
    got["merge"] = message(sharded.merge_and_unload)
    with fsdp_on_cpu():
        got["twa"] = message(lambda: hs.TWATrainer(model=tiny_llama(), args=twa_trainer_args(
            os.path.join(out, "fsdp-twa"), world, fsdp=True, fsdp_config={"version": 2}),
            train_dataset=llama_dataset()))
    got["check"] = message(lambda: hs.check_projections_match(by_hand))
    # fully_shard by hand with c ignored: check_projections_match adds the average of c's gradient after backward
    ignored = subspace_llama()
    engine = hs.find_engine(ignored)
    for layer in ignored.base_model.model.model.layers:
        fully_shard(layer, ignored_params=set(engine.vectors.parameters()))
    fully_shard(ignored, ignored_params=set(engine.vectors.parameters()))
    hs.check_projections_match(ignored)
    ids = llama_batches()[0].chunk(world)[rank]
    ignored(input_ids=ids, labels=ids).loss.backward()
    got["by_hand_grad"] = engine.coeffs["default"].grad.tolist()
    got["by_hand_cache"] = engine.inference_cache
    other_seed = hs.shard_model(subspace_llama(seed=rank))
    got["mismatch"] = message(lambda: hs.check_projections_match(other_seed))
    got["same"] = message(lambda: hs.check_projections_match(sharded))
    return got


def scenario_nonfinite(out, rank, world):
    """Rank 1 alone sees a NaN loss at step 2 (its gradients stay finite): both ranks must skip that step."""
    from transformers import Trainer

    from hf_subspace import SubspaceTrainer

    class NaNLossOnRank1(SubspaceTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = Trainer.training_step(self, model, inputs, num_items_in_batch)  # backward as usual
            if rank == 1 and self.state.global_step == 1:
                loss = loss * float("nan")
            self.nonfinite_guard.observe_loss(loss)
            return loss

    trainer = NaNLossOnRank1(model=tiny_bert(), args=trainer_args(os.path.join(out, "nonfinite"), world,
                                                                  subspace_dim=DIM),
                             train_dataset=text_dataset())
    trainer.train()
    return {"skipped": trainer.nonfinite_guard.skipped_steps,
            "c": trainer.model.base_model.subspace.coeffs["default"].detach().cpu().tolist()}


SCENARIOS = {"subspace": scenario_subspace, "twa": scenario_twa, "twa_whole": scenario_twa_whole,
             "posthoc": scenario_posthoc, "accelerate": scenario_accelerate,
             "twa_batchnorm": scenario_twa_batchnorm,
             "full": scenario_full, "mismatch": scenario_mismatch,
             "trainer_seed": scenario_trainer_seed, "nonfinite": scenario_nonfinite,
             "fsdp_train": scenario_fsdp_train, "fsdp_accelerate": scenario_fsdp_accelerate,
             "fsdp_trainer": scenario_fsdp_trainer, "fsdp_refusals": scenario_fsdp_refusals}


def main():
    out = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SCENARIOS)
    torch.set_num_threads(1)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name](out, rank, world)
        except Exception:  # noqa: BLE001
            results[name] = {"crashed": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
