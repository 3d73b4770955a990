"""Intake: a model source string → an eval-mode nn.Module, its task and example inputs.

Sources: builtin:NAME | HF model folder (config.json + safetensors) | model.pt2 |
path/to/file.py:factory | package.module:factory (+ optional safetensors weights).
Pickle checkpoints are never unpickled: .pt/.bin weights load with weights_only=True.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from optcc.intake import builtin
from optcc.graph.capture import load_exported
from optcc.errors import IntakeError
from optcc.config.recipe import TASKS, Inputs

_AUTO = {
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
}
TOKEN_TASKS = ("text-generation", "text-classification", "feature-extraction")


@dataclass
class LoadedModel:
    module: torch.nn.Module
    task: str
    source: str
    name: str
    config: dict = field(default_factory=dict)
    example_inputs: Optional[dict[str, torch.Tensor]] = None  # fixed by the source (factory or .pt2)
    zoo: Optional[str] = None  # name of a built-in with shipped calibration/eval data
    weights_sha256: str = ""

    @property
    def param_names(self) -> list[str]:
        try:
            sig = inspect.signature(self.module.forward)
        except (TypeError, ValueError):
            return []
        return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_model(source: str, task: Optional[str] = None, weights: Optional[str] = None) -> LoadedModel:
    if task is not None and task not in TASKS:
        raise IntakeError(f"--task {task}: unknown task", f"use one of {', '.join(TASKS)}")
    if source.startswith("builtin:"):
        b = builtin.resolve(source.split(":", 1)[1])
        built = b.build()
        task = task or b.task
        if isinstance(built, Path):
            lm = _load_hf_folder(built, task, source)
            lm.zoo = b.name if (built / "eval.safetensors").exists() or (built / "eval.txt").exists() else None
        else:
            lm = LoadedModel(built, task, source, b.name, _hf_config(built))
    else:
        path_part = source.rsplit(":", 1)[0] if _looks_like_factory(source) else source
        p = Path(path_part)
        if _looks_like_factory(source):
            lm = _load_factory(source, task, weights)
        elif not p.exists():
            raise IntakeError(f"{source}: no such file or folder",
                              "pass an HF model folder, a .pt2 file, file.py:factory, package.module:factory or builtin:NAME")
        elif p.is_dir():
            lm = _load_hf_folder(p, task, source)
        elif p.suffix == ".pt2":
            lm = _load_pt2(p, task, source)
        elif p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            raise IntakeError(f"{source}: a pickle checkpoint is not a model optcc can load on its own",
                              "export it with torch.export.save to .pt2, or pass file.py:factory --weights weights.safetensors")
        else:
            raise IntakeError(f"{source}: unrecognised model file type '{p.suffix}'",
                              "pass an HF model folder, a .pt2 file, file.py:factory or builtin:NAME")
    if weights and not _looks_like_factory(source):
        raise IntakeError("--weights applies only to file.py:factory or package.module:factory sources",
                          "drop --weights, or load the module through a factory")
    try:
        lm.module.eval()
    except NotImplementedError:
        pass  # ep.module() of a .pt2 refuses eval(); it was exported in inference form already
    cfg = getattr(lm.module, "config", None)
    if getattr(cfg, "use_cache", False):
        cfg.use_cache = False  # the one-forward artifact carries no cache; decoders get explicit KV I/O separately
    lm.weights_sha256 = weights_hash(lm.module)
    if lm.task not in TASKS:
        raise IntakeError(f"{source}: cannot tell the model's task", f"pass --task (one of {', '.join(TASKS)})")
    return lm


def _looks_like_factory(source: str) -> bool:
    if ":" not in source or source.startswith("builtin:"):
        return False
    head, tail = source.rsplit(":", 1)
    return tail.isidentifier() and (head.endswith(".py") or all(p.isidentifier() for p in head.split(".")))


def _hf_config(module: torch.nn.Module) -> dict:
    cfg = getattr(module, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}


def _infer_task(config: dict) -> Optional[str]:
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if "ForImageClassification" in arch:  # also DeiT's ...ForImageClassificationWithTeacher
        return "image-classification"
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("Model") and ("vocab_size" in config or "image_size" in config):
        return "feature-extraction"  # a bare encoder: text, or a vision tower (pixels in, patch embeddings out)
    return None


def _load_hf_folder(folder: Path, task: Optional[str], source: str) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise IntakeError(f"{folder}: no config.json, so this is not a Hugging Face model folder",
                          "pass a folder saved with save_pretrained, a .pt2 file or file.py:factory")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IntakeError(f"{cfg_path}: not valid JSON: {e}", "re-save the model with save_pretrained") from e
    has_st = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if not has_st:
        if pickles:
            raise IntakeError(f"{folder / pickles[0]}: pickle weights are not loaded (they can run code)",
                              "convert once with model.save_pretrained(folder, safe_serialization=True) from a trusted environment")
        raise IntakeError(f"{folder}: no *.safetensors weights", "save the model with save_pretrained")
    for st in folder.glob("*.safetensors"):
        _check_safetensors(st)
    task = task or _infer_task(config)
    if task is None:
        raise IntakeError(f"{folder}: cannot infer the task from config.json", f"pass --task (one of {', '.join(TASKS)})")
    if task not in _AUTO:
        raise IntakeError(f"{folder}: task '{task}' has no Hugging Face Auto class", f"use one of {', '.join(_AUTO)}")
    import transformers

    auto = getattr(transformers, _AUTO[task])
    transformers.utils.logging.disable_progress_bar()  # progress belongs to optcc's own display
    try:
        try:
            module = auto.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True)
        except ValueError as e:
            if "attention implementation" not in str(e):
                raise
            # The class has no SDPA attention (DeBERTa-v2, MPNet, Gemma2): load the attention it has;
            # the structure analysis finds it from its matmul + softmax.
            module = auto.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager", use_safetensors=True)
    except Exception as e:  # transformers raises many types; the message is what matters
        raise IntakeError(f"{folder}: transformers could not load it as {task}: {str(e).splitlines()[0]}",
                          "check --task and that the folder was written by save_pretrained") from e
    return LoadedModel(module, task, source, folder.name, module.config.to_dict())


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
    except Exception as e:
        raise IntakeError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})",
                          "re-save the weights with save_pretrained or safetensors.torch.save_file") from e


def _load_pt2(path: Path, task: Optional[str], source: str) -> LoadedModel:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise IntakeError(f"{path}: not a torch.export archive (not a zip file)", "save it with torch.export.save(ep, 'model.pt2')")
    from optcc.export.compiled import is_package

    if is_package(path):
        raise IntakeError(f"{path}: a compiled AOTInductor package holds no graph to optimize",
                          "pass the model it was built from, or model.exported.pt2 from the same optcc apply")
    try:
        ep = load_exported(path)
    except ValueError as e:
        raise IntakeError(f"{path}: not a readable torch.export archive ({e})",
                          "save it with torch.export.save(ep, 'model.pt2')") from e
    if task is None:
        raise IntakeError(f"{path}: a .pt2 file does not record its task", f"pass --task (one of {', '.join(TASKS)})")
    example = getattr(ep, "example_inputs", None)
    kwargs = None
    if example is not None:
        args, kw = example
        names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        kwargs = dict(kw)
        for name, a in zip(names, args):
            kwargs[name] = a
    module = ep.module()
    return LoadedModel(module, task, source, path.stem, {}, example_inputs=kwargs)


def _load_factory(source: str, task: Optional[str], weights: Optional[str]) -> LoadedModel:
    head, fn_name = source.rsplit(":", 1)
    if head.endswith(".py"):
        file = Path(head)
        if not file.exists():
            raise IntakeError(f"{file}: no such file", "pass path/to/file.py:factory_function")
        spec = importlib.util.spec_from_file_location(f"optcc_user_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = mod  # type: ignore[union-attr]
        try:
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        except Exception as e:
            raise IntakeError(f"{file}: importing it failed: {type(e).__name__}: {e}", "fix the module so it imports") from e
    else:
        try:
            mod = importlib.import_module(head)
        except ImportError as e:
            raise IntakeError(f"{head}: cannot import ({e})", "install the package or pass path/to/file.py:factory") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise IntakeError(f"{source}: '{fn_name}' is not a function in {head}", "name a function that returns an nn.Module")
    try:
        built = fn()
    except Exception as e:
        raise IntakeError(f"{source}: the factory raised {type(e).__name__}: {e}", "fix the factory") from e
    example = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], dict):
        built, example = built
    if not isinstance(built, torch.nn.Module):
        raise IntakeError(f"{source}: the factory returned {type(built).__name__}, not an nn.Module",
                          "return an nn.Module, or (module, example_inputs_dict)")
    if weights:
        try:
            built.load_state_dict(load_weights(Path(weights)), strict=True)
        except RuntimeError as e:  # missing/unexpected keys or shape mismatches
            first = " ".join(str(e).split())[:300]
            raise IntakeError(f"{weights}: does not fit {source} ({first})",
                              "pass the state dict saved from this model (model.state_dict())") from e
    config = _hf_config(built)
    task = task or _infer_task(config) or ("tensor" if example else None)
    if task is None:
        raise IntakeError(f"{source}: cannot tell the model's task", f"pass --task (one of {', '.join(TASKS)})")
    return LoadedModel(built, task, source, fn_name, config, example_inputs=example)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a pickle file with weights_only=True (never arbitrary code)."""
    if not path.exists():
        raise IntakeError(f"{path}: no such weights file", "pass a .safetensors file")
    if path.suffix == ".safetensors":
        _check_safetensors(path)
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntakeError(f"{path}: refused: loading it would need full unpickling, which can run code",
                          "convert it to safetensors (safetensors.torch.save_file(state_dict, 'w.safetensors')) in a trusted environment") from e
    if not isinstance(state, dict):
        raise IntakeError(f"{path}: holds a {type(state).__name__}, not a state dict", "save model.state_dict()")
    return state


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = t.detach().contiguous().cpu()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_inputs(lm: LoadedModel, inputs: Inputs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs from the recipe's shapes and the model's config. Deterministic."""
    if inputs.tensors:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(*shape, generator=g) for k, shape in inputs.tensors.items()}
    if lm.example_inputs is not None:
        return dict(lm.example_inputs)
    g = torch.Generator().manual_seed(seed)
    names = lm.param_names
    cfg = lm.config
    if lm.task == "image-classification" or ("pixel_values" in names and "input_ids" not in names):
        size = inputs.image_size or cfg.get("image_size") or 224
        channels = cfg.get("num_channels", 3)
        key = "pixel_values" if "pixel_values" in names or not names else names[0]
        return {key: torch.randn(inputs.batch, channels, size, size, generator=g)}
    if lm.task in TOKEN_TASKS:
        vocab = cfg.get("vocab_size") or _embedding_rows(lm.module)
        if vocab is None:
            raise IntakeError(f"{lm.source}: cannot find the vocabulary size for token inputs",
                              "set model.inputs.tensors in the recipe, or return example inputs from the factory")
        max_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if max_pos and inputs.seq_len > max_pos:
            raise IntakeError(f"model.inputs.seq_len {inputs.seq_len} exceeds the model's {max_pos} positions",
                              f"set model.inputs.seq_len <= {max_pos}")
        key = "input_ids" if "input_ids" in names or not names else names[0]
        out = {key: torch.randint(0, vocab, (inputs.batch, inputs.seq_len), generator=g)}
        if "attention_mask" in names and lm.task != "text-generation":
            out["attention_mask"] = torch.ones(inputs.batch, inputs.seq_len, dtype=torch.long)
        if "token_type_ids" in names and lm.task != "text-generation":  # what BERT-family tokenizers return
            out["token_type_ids"] = torch.zeros(inputs.batch, inputs.seq_len, dtype=torch.long)
        return out
    raise IntakeError(f"{lm.source}: task '{lm.task}' needs explicit input shapes",
                      "set model.inputs.tensors: {name: [shape]} in the recipe")


def _embedding_rows(module: torch.nn.Module) -> Optional[int]:
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    return None
