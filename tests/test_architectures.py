"""Architecture coverage: tiny random-weight models of the Hugging Face families people deploy,
saved with save_pretrained and loaded as a user's model folder. Each one takes its family's
stacked passes and exports both artifacts, checked as `optcc apply` checks them, or a pass
refuses with a one-line reason that names what would work."""
import contextlib
import copy
import re

import pytest
import torch

from conftest import pass_context
from optcc.api import emit_checked, prepare
from optcc.graph.capture import capture
from optcc.intake.decoder import dynamic_shapes, no_guard_module
from optcc.errors import OptccError
from optcc.pipeline.manager import run_passes
from optcc.config.recipe import parse_recipe

ENC = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
           max_position_embeddings=128)
DEC = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256)
VIS = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)

STACKS = {  # the passes a user stacks on each family
    "text": ["layer_skip: {drop: 1}", "token_merge: {r: 1, unmerge: true}", "fuse_linears", "quantize: {scheme: int8-dynamic}"],
    "image": ["layer_skip: {drop: 1}", "token_merge: {r: 2}", "fuse_linears", "quantize: {scheme: int8-dynamic}"],
    "tower": ["layer_skip: {drop: 1}", "token_merge: {r: 2, unmerge: true}", "fuse_linears", "quantize: {scheme: int8-dynamic}"],
    "decoder": ["layer_skip: {drop: 1}", "kv_share: {mode: merge, start: 0.25}", "fuse_linears",
                "quantize: {scheme: int8-dynamic}", "kv_quant"],
}

# q/k/v and gate/up already one linear each (ModernBERT's Wqkv and Wi, Phi-3's qkv_proj and gate_up_proj,
# GPT-2's c_attn, GPT-NeoX's query_key_value)
_ONE_LINEAR = r"fuse_linears found nothing to merge \(no two linear layers read the same activation\)"

# name: (config class, model class, config, family, {pass: the refusal's message})
ARCHS = {
    "bert": ("BertConfig", "BertModel", ENC, "text", {}),
    "roberta": ("RobertaConfig", "RobertaModel", {**ENC, "max_position_embeddings": 130}, "text", {}),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, hidden_dim=128, max_position_embeddings=128), "text", {}),
    "albert": ("AlbertConfig", "AlbertModel", {**ENC, "embedding_size": 32}, "text",
               {"layer_skip": "runs 4 times with shared weights.*quantize works", "token_merge": "runs 4 times with shared weights",
                "fuse_linears": r"nothing to merge \(its weight is read elsewhere too \(tied, or the layer runs more than once"}),
    "electra": ("ElectraConfig", "ElectraModel", {**ENC, "embedding_size": 64}, "text", {}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {**ENC, "max_position_embeddings": 130}, "text", {}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", ENC, "text",
                   {"token_merge": r"explicit matmul \+ softmax.*use a model class with SDPA attention"}),
    "modernbert": ("ModernBertConfig", "ModernBertModel",
                   dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                        sep_token_id=2), "text", {"token_merge": "attention is rotary.*layer_skip and quantize work",
                                          "fuse_linears": _ONE_LINEAR}),
    "vit": ("ViTConfig", "ViTForImageClassification", {**VIS, "num_labels": 10}, "image", {}),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {**VIS, "num_labels": 10}, "image", {}),
    "dinov2": ("Dinov2Config", "Dinov2Model", VIS, "tower", {}),
    "clip-vision": ("CLIPVisionConfig", "CLIPVisionModel", VIS, "tower", {}),
    "siglip-vision": ("SiglipVisionConfig", "SiglipVisionModel", VIS, "tower", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", DEC, "decoder", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DEC, "decoder", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DEC, "head_dim": 16}, "decoder", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", DEC, "decoder", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DEC, "head_dim": 16}, "decoder", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DEC, "head_dim": 16}, "decoder", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**DEC, "pad_token_id": 0}, "decoder", {"fuse_linears": _ONE_LINEAR}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=256), "decoder",
             {"fuse_linears": _ONE_LINEAR}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=256), "decoder", {"fuse_linears": _ONE_LINEAR}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, ffn_dim=128, num_attention_heads=4,
                 max_position_embeddings=256, word_embed_proj_dim=64), "decoder", {}),
}


def _save(name: str, folder):
    import transformers

    config_cls, model_cls, config, _, _ = ARCHS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    model.save_pretrained(folder)
    return folder


def _name(step: str) -> str:
    return re.match(r"[a-z_]+", step).group(0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_takes_its_family_passes(name, tmp_path):
    family, refused = ARCHS[name][3], ARCHS[name][4]
    folder = _save(name, tmp_path / name)
    base = "version: 1\nmodel: {inputs: {batch: 2, seq_len: %d}}\n" % (12 if family == "decoder" else 16)
    prep = prepare(str(folder), None, None, parse_recipe(base))
    with no_guard_module() if prep.cache else contextlib.nullcontext():
        gm = capture(prep.lm.module, prep.inputs, True, dynamic_shapes(prep.cache) if prep.cache else None).module()
        for step in STACKS[family]:
            if _name(step) in refused:  # the refusal is one clear line naming what would work
                with pytest.raises(OptccError, match=refused[_name(step)]):
                    run_passes(copy.deepcopy(gm), parse_recipe(base + f"passes:\n  - {step}\n").passes, pass_context(prep))
        steps = [s for s in STACKS[family] if _name(s) not in refused]
        recipe = parse_recipe(base + "passes:\n" + "".join(f"  - {s}\n" for s in steps) + "emit: {formats: [onnx, exported]}\n")
        ctx = pass_context(prep)
        gm, records = run_passes(gm, recipe.passes, ctx)
        assert [r.name for r in records] == [_name(s) for s in steps] and all(r.modified for r in records)
        assert records[-1].fidelity["finite"]
        artifacts = emit_checked(gm, ctx, records, recipe, tmp_path)
        assert sorted(a.format for a in artifacts) == ["exported", "onnx"]
