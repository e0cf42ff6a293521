"""Model cards and pushing to the Hugging Face Hub.

``PeftModel.push_to_hub`` comes from transformers and writes a card that says ``library_name: transformers``.
For subspace adapters, :func:`push_to_hub` (also installed as ``PeftModel.push_to_hub`` for this method by
:mod:`hf_subspace._registry`) saves the adapter, writes our card (``library_name: peft``, the base model, tags,
d, D, projection, seed, sizes, metrics, how to load) and uploads the folder with ``HfApi.upload_folder``.
"""
from __future__ import annotations

import os
import string
import tempfile
from importlib import resources

from huggingface_hub import HfApi, ModelCardData


ADAPTER_FILE = "adapter_model.safetensors"

REFERENCES_SUBSPACE = """\
- Li, Farkhoor, Liu, Yosinski. *Measuring the Intrinsic Dimension of Objective Landscapes.* ICLR 2018.
- Aghajanyan, Zettlemoyer, Gupta. *Intrinsic Dimensionality Explains the Effectiveness of Language Model
  Fine-Tuning.* ACL 2021."""


def _template(name: str) -> string.Template:
    text = resources.files("hf_subspace.model_cards").joinpath(name).read_text(encoding="utf-8")
    return string.Template(text)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _format_metrics(metrics: dict | None) -> str:
    if not metrics:
        return "No training metrics were recorded with this adapter."
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def _auto_class(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    archs = getattr(getattr(base, "config", None), "architectures", None) or [type(base).__name__]
    name = archs[0]
    for suffix, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForImageClassification", "AutoModelForImageClassification"),
                         ("ForObjectDetection", "AutoModelForObjectDetection"),
                         ("ForTokenClassification", "AutoModelForTokenClassification")):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def full_model_bytes(model) -> int:
    """Bytes of the base model's weights (each tensor once, tied weights once)."""
    seen, total = set(), 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for p in list(base.parameters()) + list(base.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def adapter_card(model, output_dir: str, adapter_name: str = "default", repo_id: str | None = None) -> str:
    """The README.md text for the subspace adapter ``adapter_name`` of ``model`` saved in ``output_dir``."""
    config = model.peft_config[adapter_name]
    path = os.path.join(output_dir, ADAPTER_FILE)
    adapter_bytes = os.path.getsize(path) if os.path.exists(path) else None
    full = full_model_bytes(model)
    base_model = config.base_model_name_or_path or "unknown"
    tags = ["hf-subspace", "peft", "intrinsic-dimension", f"projection-{config.projection}", f"mode-{config.mode}"]
    if config.projection == "trajectory":
        tags[2] = "twa"
    data = ModelCardData(library_name="peft", base_model=config.base_model_name_or_path, tags=tags)
    method = ("SAID (one learned scale per tensor)" if config.mode == "said" else "DID (global random subspace)")
    if config.projection == "trajectory":
        method = "TWA (trajectory basis)"
    fields = dict(
        metadata=data.to_yaml(),
        title=f"{repo_id or 'Subspace adapter'} (hf_subspace, d = {config.dim})",
        base_model=base_model,
        method=method,
        projection=config.projection,
        seed=config.seed,
        projection_saved=" — P saved in the adapter" if config.save_projection else "",
        dim=f"{config.dim:,}",
        num_weights=f"{config.num_weights:,}" if config.num_weights else "unknown",
        adapter_size=human_bytes(adapter_bytes) if adapter_bytes else "a few kilobytes",
        full_size=human_bytes(full),
        ratio=f"{full / adapter_bytes:,.0f}" if adapter_bytes else "?",
        metrics=_format_metrics(config.training_metrics),
        auto_class=_auto_class(model),
        repo_id=repo_id or output_dir,
        references=REFERENCES_SUBSPACE,
    )
    return _template("subspace_adapter.md").substitute(fields)


def write_adapter_card(model, output_dir: str, repo_id: str | None = None) -> str:
    """Write ``output_dir``/README.md for the model's first adapter (PEFT saves one card per folder)."""
    path = os.path.join(output_dir, "README.md")
    names = list(model.peft_config)
    text = adapter_card(model, output_dir, names[0], repo_id=repo_id)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def push_to_hub(model, repo_id: str, *, token=None, private=None, commit_message: str | None = None,
                revision: str | None = None, create_pr: bool = False, api: HfApi | None = None, **save_kwargs):
    """Save the adapter, write our model card, and upload both to ``repo_id``. Returns the commit info."""
    api = api or HfApi(token=token, library_name="hf_subspace")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        write_adapter_card(model, tmp, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                 create_pr=create_pr,
                                 commit_message=commit_message or "Upload hf_subspace adapter")


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

